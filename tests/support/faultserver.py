"""The fault proxy's HTTP side: a threading server whose handler forwards each request to the
registry and applies the faults its :class:`~tests.support.faultproxy.FaultProxy` hands out.

Every decision (which fault, which epoch, whether to redirect) is taken by asking the proxy; the
handler only speaks HTTP: forwarding, relaying bodies byte-exactly, cutting, stalling, replying.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import re
import select
import socket
import socketserver
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from typing import TYPE_CHECKING, Any

from tests.support.faultplan import (
    AUTH_FAILED_BODY,
    BLOB_PATH,
    CDN_PATH,
    CHUNK,
    HOP_BY_HOP,
    SERVER_BUSY_BODY,
    Aborted,
    Plan,
)

if TYPE_CHECKING:
    from tests.support.faultproxy import FaultProxy

__all__ = ["ProxyHandler", "ProxyServer", "shutdown_socket"]


def shutdown_socket(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], proxy: FaultProxy):
        self.proxy = proxy
        super().__init__(address, ProxyHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up, and connections shut down by stop(), are business as usual.
        if isinstance(sys.exc_info()[1], OSError) or self.proxy._stopping.is_set():
            return
        super().handle_error(request, client_address)


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ProxyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.proxy._track(self.connection, add=False)

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:
            self.close_connection = True

    # -- one request -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        proxy = self.server.proxy
        self._entry = proxy._begin(self.command, self.path, self.headers.get("Range"))
        self._sent = 0
        epoch = proxy._current_epoch()
        path, _, query = self.path.partition("?")
        try:
            canned = proxy._take_canned(self.command, path)
            cdn = re.match(CDN_PATH, path)
            blob = re.match(BLOB_PATH, path)
            if canned is not None:
                self._drain()
                headers = canned.headers
                if canned.retry_after_in is not None:
                    when = email.utils.formatdate(time.time() + canned.retry_after_in, usegmt=True)
                    headers = [*headers, ("Retry-After", when)]
                self._reply(canned.status, headers, canned.body)
            elif cdn is not None:
                self._serve_cdn(cdn["digest"], query, epoch)
            elif blob is not None and self.command == "GET" and proxy._redirects_on():
                self._redirect(blob["name"], blob["digest"], path)
            elif blob is not None and self.command == "GET" and proxy._take_busy():
                self._busy()
            else:
                digest = blob["digest"] if blob is not None and self.command == "GET" else None
                self._forward(self.path, self._request_headers(), digest, epoch)
        except Aborted:
            self.close_connection = True
        finally:
            proxy._end()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _serve_cdn(self, digest: str, query: str, epoch: int) -> None:
        proxy = self.server.proxy
        valid, authorization, repo = proxy._check_grant(digest, query)
        self._drain()
        if self.command not in ("GET", "HEAD") or not valid:
            error = [
                ("Content-Type", "application/xml"),
                ("x-ms-error-code", "AuthenticationFailed"),
            ]
            self._reply(403, error, AUTH_FAILED_BODY)
        elif self.command == "GET" and proxy._take_busy():
            self._busy()
        else:
            wanted = ("range", "if-range", "if-match", "if-none-match", "accept-encoding")
            headers = {k: v for k, v in self._request_headers().items() if k.lower() in wanted}
            if authorization is not None:
                headers["Authorization"] = authorization
            target = f"/v2/{repo}/blobs/{digest}"
            self._forward(
                target, headers, digest if self.command == "GET" else None, epoch, cdn=True
            )

    def _redirect(self, repo: str, digest: str, path: str) -> None:
        """Ask the registry first, as ghcr.io does, so auth and unknown blobs still fail."""
        headers = {k: v for k, v in self._request_headers().items() if k.lower() != "range"}
        status = self._upstream_status("HEAD", path, headers)
        location = self.server.proxy._grant(digest, repo, self.headers.get("Authorization"))
        if status == 200 and location is not None:
            self._drain()
            version = ("Docker-Distribution-Api-Version", "registry/2.0")
            self._reply(307, [("Location", location), version], b"")
        else:
            self._forward(self.path, self._request_headers(), None, 0)

    def _busy(self) -> None:
        self._drain()
        headers = [("Content-Type", "application/xml"), ("x-ms-error-code", "ServerBusy")]
        self._reply(503, headers, SERVER_BUSY_BODY)

    # -- plumbing ----------------------------------------------------------------------------

    def _request_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            if key.lower() not in HOP_BY_HOP:
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return headers

    def _request_body(self) -> tuple[bytes | _Limited | None, int | None]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = _read_chunked(self.rfile)
            return body, len(body)
        length = int(self.headers.get("Content-Length") or 0)
        return (_Limited(self.rfile, length), length) if length else (None, None)

    def _drain(self) -> None:
        body, _ = self._request_body()
        while isinstance(body, _Limited) and body.read(CHUNK):
            pass

    def _connect(self) -> http.client.HTTPConnection:
        host, port, _ = self.server.proxy._upstream
        return http.client.HTTPConnection(host, port, timeout=30)

    def _upstream_status(self, method: str, path: str, headers: dict[str, str]) -> int:
        conn = self._connect()
        try:
            conn.request(method, path, headers={**headers, "Host": self._upstream_netloc()})
            return conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return 0
        finally:
            conn.close()

    def _upstream_netloc(self) -> str:
        return self.server.proxy._upstream[2]

    def _forward(
        self,
        target: str,
        headers: dict[str, str],
        digest: str | None,
        epoch: int,
        *,
        cdn: bool = False,
    ) -> None:
        """Send the request upstream and relay the answer; ``digest`` marks a blob GET whose
        2xx body is subject to the body faults."""
        body, length = self._request_body() if not cdn else (None, None)
        headers = {**headers, "Host": self._upstream_netloc()}
        if length is not None:
            headers["Content-Length"] = str(length)
        conn = self._connect()
        try:
            try:
                conn.request(self.command, target, body=body, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self._bad_gateway(exc)
                return
            self._relay(resp, digest if resp.status in (200, 206) else None, epoch, cdn)
        finally:
            conn.close()

    def _bad_gateway(self, exc: Exception) -> None:
        error = {"code": "UNAVAILABLE", "message": f"upstream failed: {exc!r}"}
        body = json.dumps({"errors": [error]}).encode()
        self.close_connection = True  # the request body may be half read
        self._reply(502, [("Content-Type", "application/json"), ("Connection", "close")], body)

    def _relay(
        self, resp: http.client.HTTPResponse, digest: str | None, epoch: int, cdn: bool
    ) -> None:
        proxy = self.server.proxy
        headers = []
        for key, value in resp.getheaders():
            lower = key.lower()
            if lower in HOP_BY_HOP or (cdn and lower.startswith("docker-")):
                continue
            if lower == "location" and value.startswith(proxy.upstream_url):
                value = proxy.url + value[len(proxy.upstream_url) :]
            headers.append((key, value))
        declared = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        if declared is None and not no_body:
            self._reply(resp.status, headers, resp.read())
            return
        if declared is not None:
            headers.append(("Content-Length", declared))
        length = int(declared) if declared is not None else None
        plan = None
        if digest is not None and not no_body:
            match = re.match(r"bytes (\d+)-", resp.getheader("Content-Range") or "")
            plan = proxy._plan(epoch, digest, int(match[1]) if match else 0, length)
            if plan.limit is not None and (length is None or plan.limit < length):
                headers.append(("Connection", "close"))
        self._send_head(resp.status, headers)
        if not no_body:
            self._stream(resp, plan, length)

    def _stream(
        self, resp: http.client.HTTPResponse, plan: Plan | None, length: int | None
    ) -> None:
        proxy, started, received = self.server.proxy, time.monotonic(), 0
        while plan is None or plan.limit is None or self._sent < plan.limit:
            data = resp.read1(CHUNK)
            if not data:
                break
            received += len(data)
            if plan is None:
                self._write(data)
                continue
            if plan.limit is not None:
                data = data[: plan.limit - self._sent]
            if plan.flip_at is not None and 0 <= plan.flip_at - self._sent < len(data):
                at = plan.flip_at - self._sent
                data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
            size, crossed = proxy._reserve(plan, len(data))
            try:
                self._write(data[:size])
            except OSError:
                proxy._unreserve(size)
                raise
            if crossed:
                self._abort()
            if plan.rate:
                pause = started + self._sent / plan.rate - time.monotonic()
                proxy._stopping.wait(max(0.0, pause))
        fault = plan.fault if plan is not None else None
        if (
            fault is not None
            and plan is not None
            and plan.limit is not None
            and (plan.limit < (length if length is not None else sys.maxsize))
        ):
            if fault.kind == "stall":
                self._stall(fault.seconds)
            self._abort(reset=fault.reset)
        if length is not None and received < length:
            self._abort()  # the upstream itself hung up early: pass that on

    def _stall(self, seconds: float) -> None:
        """Send nothing for ``seconds``, ending early if the client hangs up or stop() runs,
        so a stalled request does not outlive its client."""
        deadline = time.monotonic() + seconds
        while not self.server.proxy._stopping.wait(min(0.05, deadline - time.monotonic())):
            if time.monotonic() >= deadline or self._client_gone():
                return

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _abort(self, reset: bool = False) -> None:
        self.close_connection = True
        if reset:
            # Linger 0: the final close (after the handler's file objects) sends a RST.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        else:
            shutdown_socket(self.connection)
        raise Aborted

    def _send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.send_response_only(status)
        for key, value in headers:
            self.send_header(key, value)
        self.server.proxy._note(self._entry, status=status)
        self.end_headers()

    def _write(self, data: bytes) -> None:
        """Count, then send: whoever has read the bytes finds them counted."""
        self.server.proxy._note(self._entry, sent=len(data))
        self._sent += len(data)
        try:
            self.wfile.write(data)
        except OSError:
            self.server.proxy._note(self._entry, sent=-len(data))
            raise

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """A whole answer; a Content-Length in ``headers`` wins, and if it lies the
        connection is closed after the body."""
        declared = next((v for k, v in headers if k.lower() == "content-length"), None)
        if declared is None:
            headers = [*headers, ("Content-Length", str(len(body)))]
        elif declared != str(len(body)):
            headers = [*headers, ("Connection", "close")]
        self._send_head(status, headers)
        if self.command != "HEAD" and body:
            self._write(body)


class _Limited:
    """The next ``remaining`` bytes of a request body, for http.client to send on."""

    def __init__(self, stream: BufferedIOBase, remaining: int):
        self._stream, self._remaining = stream, remaining

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._remaining:
            size = self._remaining
        data = self._stream.read(size) if size else b""
        self._remaining -= len(data)
        if size and not data:
            raise ConnectionError("client closed the request body early")
        return data


def _read_chunked(stream: BufferedIOBase) -> bytes:
    body = bytearray()
    while True:
        line = stream.readline(1024)
        if not line:
            raise ConnectionError("client closed a chunked request body early")
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while stream.readline(1024) not in (b"\r\n", b"\n", b""):
                pass
            return bytes(body)
        body += stream.read(size)
        stream.readline(1024)
