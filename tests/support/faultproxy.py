"""A fault-injecting HTTP/1.1 reverse proxy in front of a real registry on loopback.

tartflow has to survive what ghcr.io and its Azure blob CDN do to long downloads: connections
cut mid-body, ``503 ServerBusy`` bursts once an egress quota is spent, 429s with
``Retry-After``, signed redirect URLs that expire, corrupted bytes. :class:`FaultProxy` forwards
every request to the registry unchanged and injects those faults on demand, thread-safely, while
a test runs. Stdlib only, so it runs wherever the tests run.

Fault counts are consumed by *blob body responses*: a 200/206 answer to a GET of
``/v2/<name>/blobs/<digest>`` (or of the proxy's ``/cdn/<digest>`` URL when
:meth:`FaultProxy.cdn_redirects` is on, where the registry path only redirects). HEADs, error
answers and manifests are never cut. Cuts close the connection with a FIN after exactly the
stated number of body bytes, so a client sees a deterministic short body (``reset=True`` sends
a RST instead).

Error shapes: distribution spec https://github.com/opencontainers/distribution-spec/blob/main/
spec.md#error-codes; Azure Blob error codes https://learn.microsoft.com/rest/api/storageservices/
blob-service-error-codes.
"""

from __future__ import annotations

import contextlib

import hashlib
import hmac
import http.client
import json
import re
import secrets
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, quote, urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "AUTH_FAILED_BODY",
    "BLOB_PATH",
    "CDN_PATH",
    "SERVER_BUSY_BODY",
    "FaultProxy",
    "RequestRecord",
]

BLOB_PATH = r"^/v2/(?P<name>.+)/blobs/(?P<digest>[A-Za-z0-9_+.-]+:[A-Za-z0-9=_-]+)$"
CDN_PATH = r"^/cdn/(?P<digest>[A-Za-z0-9_+.-]+:[A-Za-z0-9=_-]+)$"
SERVER_BUSY_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
    b"<Message>Egress is over the account limit.</Message></Error>"
)
AUTH_FAILED_BODY = (
    b"<Error><Code>AuthenticationFailed</Code>"
    b"<Message>Server failed to authenticate the request.</Message></Error>"
)
CHUNK = 64 * 1024
# Not forwarded either way: hop-by-hop headers, and the framing headers the proxy sets itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "host",
        "content-length",
    }
)


class RequestRecord(NamedTuple):
    """One request as the proxy answered it; compares equal to a plain 5-tuple."""

    method: str
    path: str  # as the client sent it, query included
    status: int  # 0 until the status line is sent
    range_header: str | None  # the request's Range header
    bytes_sent: int  # response body bytes written to the client so far


@dataclass
class _Canned:
    method: str
    pattern: re.Pattern[str]
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    remaining: int | None  # None: forever

    def matches(self, method: str, path: str) -> bool:
        wanted = self.method in ("*", method)
        return (
            wanted
            and (self.remaining is None or self.remaining > 0)
            and bool(self.pattern.search(path))
        )


@dataclass
class _BodyFault:
    kind: str  # "cut" | "stall" | "short"
    nbytes: int | None = None
    seconds: float = 0.0
    reset: bool = False
    missing: int | None = None


@dataclass
class _Plan:
    """How one blob body response is to be (mis)served; fixed when its headers go out."""

    epoch: int
    limit: int | None = None  # body bytes to send before the fault ends the response
    fault: _BodyFault | None = None
    flip_at: int | None = None  # body-relative offset of the byte to invert
    rate: float | None = None


class _Aborted(Exception):
    """The response was cut on purpose; the connection is already shut down."""


class FaultProxy:
    """Reverse proxy on ``127.0.0.1`` in front of the registry at ``upstream_url`` (http only).

    Requests are forwarded with ``Host`` set to the upstream; absolute ``Location`` headers that
    point at the upstream are rewritten to point at the proxy. Every fault setter is safe to
    call from any thread while requests are in flight.
    """

    def __init__(self, upstream_url: str, *, port: int = 0):
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream_url!r}")
        self.upstream_url = f"http://{parts.netloc}"
        self._upstream = (parts.hostname, parts.port or 80, parts.netloc)
        self._port = port
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._epoch = 0  # bumped by each egress cut; a blob response from an older epoch stops
        self._bound: int | None = None
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._secret = secrets.token_bytes(32)
        self.reset_counters()
        self.clear_faults()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        server = _Server(("127.0.0.1", self._port), self)
        self._server, self._bound = server, server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"faultproxy:{server.server_address[1]}",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, shut down every open connection (stalled ones too), and return
        within about a second; calling it again does nothing."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            conns = dict(self._conns)
        for conn in conns:
            _shutdown(conn)
        server.server_close()
        deadline = time.monotonic() + 0.8
        for thread in [self._thread, *conns.values()]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``; still answers after :meth:`stop`, to test refused connections."""
        if self._bound is None:
            raise RuntimeError("FaultProxy was never started")
        return f"127.0.0.1:{self._bound}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- accounting --------------------------------------------------------------------------

    @property
    def blob_bytes_served(self) -> int:
        """Body bytes of 200/206 blob responses (registry path and CDN path) sent so far."""
        with self._lock:
            return self._blob_bytes

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request, in arrival order. Counts are updated before bytes go
        out, so a client that has read a response sees it complete here; a request still
        being answered shows what has been sent so far (see :meth:`wait_idle`)."""
        with self._lock:
            return [RequestRecord(*entry) for entry in self._requests]

    def reset_counters(self) -> None:
        """Count afresh from here, once no response is being sent. A client killed mid-body
        leaves its handler sending (and counting) one more chunk before the socket fails;
        that chunk belongs to the run before, not to the next count."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._active == 0, 10):
                raise AssertionError("fault proxy: a response was still being sent 10 s after its client left")
            self._blob_bytes = 0
            self._requests: list[list[Any]] = []

    def wait_idle(self, timeout: float = 2.0) -> bool:
        """Wait until no request is being answered (e.g. after a client hung up mid-body);
        False if that took longer than ``timeout`` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    # -- faults ------------------------------------------------------------------------------

    def clear_faults(self) -> None:
        """Forget every fault, redirect mode and throttle; counters are kept."""
        with self._lock:
            self._thresholds: list[int] = []
            self._busy_burst = 3
            self._busy_left = 0
            self._canned: list[_Canned] = []
            self._body_faults: deque[_BodyFault] = deque()
            self._flips: list[list[Any]] = []  # [digest, offset, remaining]
            self._cdn_ttl: float | None = None
            self._cdn_host: str | None = None
            self._grants: dict[str, str | None] = {}  # signature -> Authorization
            self._rate: float | None = None

    def egress_503_at(self, thresholds: list[int], burst: int = 3) -> None:
        """When :attr:`blob_bytes_served` reaches each threshold, send exactly up to it, cut
        every blob response in flight, and answer the next ``burst`` blob body GETs with
        Azure's ``503 ServerBusy``. Thresholds already passed fire on the next blob byte."""
        with self._lock:
            self._thresholds = sorted(thresholds)
            self._busy_burst = burst

    def status_burst(
        self,
        status: int,
        count: int,
        *,
        retry_after: str | None = None,
        path_regex: str = BLOB_PATH,
        method: str = "*",
    ) -> None:
        """Answer the next ``count`` requests whose path matches with ``status`` and a
        distribution-spec error body (``TOOMANYREQUESTS`` for 429, ``UNAVAILABLE`` else).
        ``retry_after`` is sent verbatim: delay-seconds or an HTTP-date. This is an
        :meth:`override`, so it comes before every other fault, including CDN redirects."""
        code = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"
        message = "rate limit exceeded" if status == 429 else "service unavailable"
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        self.override(method, path_regex, status, headers, body, count)

    def cut_after(self, nbytes: int, count: int = 1, *, reset: bool = False) -> None:
        """The next ``count`` blob body responses end after ``nbytes`` body bytes.
        cut, stall and short faults share one queue, used in the order they were set."""
        self._queue(count, _BodyFault("cut", nbytes=nbytes, reset=reset))

    def stall_after(self, nbytes: int, seconds: float, count: int = 1) -> None:
        """Send ``nbytes`` of the body, then nothing for ``seconds``, then close."""
        self._queue(count, _BodyFault("stall", nbytes=nbytes, seconds=seconds))

    def short_content_length(self, count: int = 1, *, missing: int | None = None) -> None:
        """Declare the real Content-Length but close cleanly ``missing`` bytes early
        (default: after half the body)."""
        self._queue(count, _BodyFault("short", missing=missing))

    def flip_byte(self, digest: str, offset: int, count: int = 1) -> None:
        """Invert the byte at blob offset ``offset`` in the next ``count`` responses for
        ``digest`` whose range covers it."""
        with self._lock:
            self._flips.append([digest, offset, count])

    def cdn_redirects(self, ttl: float, *, host: str | None = None) -> None:
        """Answer blob GETs that the registry would serve with ``307`` to a signed
        ``/cdn/<digest>`` URL on ``host`` (default: the proxy) that works for ``ttl`` seconds,
        Range included, without Authorization; afterwards it answers ``403
        AuthenticationFailed``. The registry is asked (HEAD) first, so 401/404 still pass."""
        with self._lock:
            self._cdn_ttl = ttl
            self._cdn_host = host

    def throttle(self, bytes_per_second: float | None) -> None:
        """Pace each blob body response to this many bytes per second (None: full speed);
        concurrent responses each get the full rate."""
        with self._lock:
            self._rate = bytes_per_second

    def override(
        self,
        method: str,
        path_regex: str,
        status: int,
        headers: dict[str, str],
        body: bytes,
        count: int | None = None,
    ) -> None:
        """Serve a canned answer to requests of ``method`` (``"*"``: any) whose path (without
        query) matches ``path_regex`` (``re.search``); ``count=None`` means forever. A
        Content-Length in ``headers`` is sent verbatim, so it may lie."""
        entry = _Canned(
            method.upper() if method != "*" else "*",
            re.compile(path_regex),
            status,
            list(headers.items()),
            body,
            count,
        )
        with self._lock:
            self._canned.append(entry)

    def _queue(self, count: int, fault: _BodyFault) -> None:
        with self._lock:
            self._body_faults.extend(fault for _ in range(count))

    # -- used by the handler -----------------------------------------------------------------

    def _take_canned(self, method: str, path: str) -> _Canned | None:
        with self._lock:
            for entry in self._canned:
                if entry.matches(method, path):
                    if entry.remaining is not None:
                        entry.remaining -= 1
                    return entry
        return None

    def _take_busy(self) -> bool:
        with self._lock:
            if self._busy_left > 0:
                self._busy_left -= 1
                return True
        return False

    def _plan(self, epoch: int, digest: str, start: int, length: int | None) -> _Plan:
        with self._lock:
            plan = _Plan(epoch, rate=self._rate)
            if self._body_faults:
                plan.fault = fault = self._body_faults.popleft()
                if fault.kind == "short" and length is not None:
                    plan.limit = length - (fault.missing or (length + 1) // 2)
                    plan.limit = max(0, plan.limit)
                elif fault.kind != "short":
                    plan.limit = fault.nbytes
            for flip in self._flips:
                end = start + length if length is not None else sys.maxsize
                if flip[0] == digest and flip[2] > 0 and start <= flip[1] < end:
                    flip[2] -= 1
                    plan.flip_at = flip[1] - start
                    break
            return plan

    def _reserve(self, plan: _Plan, size: int) -> tuple[int, bool]:
        """Admit up to ``size`` blob bytes; True when this crossed an egress threshold, in
        which case every other blob response in flight is cut too."""
        with self._lock:
            if plan.epoch != self._epoch:
                return 0, True
            crossed = bool(self._thresholds) and self._blob_bytes + size >= self._thresholds[0]
            if crossed:
                size = max(0, self._thresholds.pop(0) - self._blob_bytes)
                self._epoch += 1
                self._busy_left += self._busy_burst
            self._blob_bytes += size
            return size, crossed

    def _unreserve(self, size: int) -> None:
        with self._lock:
            self._blob_bytes -= size

    def _sign(self, digest: str, repo: str, expiry: str) -> str:
        message = f"{digest}\n{repo}\n{expiry}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _grant(self, digest: str, repo: str, authorization: str | None) -> str | None:
        """A fresh signed CDN URL, or None when redirects are off."""
        with self._lock:
            if self._cdn_ttl is None:
                return None
            expiry = f"{time.time() + self._cdn_ttl:.3f}"
            sig = self._sign(digest, repo, expiry)
            self._grants[sig] = authorization
            host = self._cdn_host or self.host
        return f"http://{host}/cdn/{digest}?sig={sig}&se={expiry}&repo={quote(repo, safe='/')}"

    def _check_grant(self, digest: str, query: str) -> tuple[bool, str | None, str]:
        """(valid, Authorization to use upstream, repository) for a CDN URL's query."""
        params = {k: v[0] for k, v in parse_qs(query).items()}
        repo, expiry, sig = params.get("repo", ""), params.get("se", ""), params.get("sig", "")
        try:
            alive = float(expiry) > time.time()
        except ValueError:
            alive = False
        genuine = hmac.compare_digest(sig, self._sign(digest, repo, expiry))
        with self._lock:
            known = sig in self._grants
            return alive and genuine and known, self._grants.get(sig), repo

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if not add:
                self._conns.pop(conn, None)
            elif self._stopping.is_set():
                _shutdown(conn)
            else:
                self._conns[conn] = threading.current_thread()

    def _begin(self, method: str, path: str, range_: str | None) -> list[Any]:
        with self._lock:
            entry = [method, path, 0, range_, 0]
            self._requests.append(entry)
            self._active += 1
            return entry

    def _note(self, entry: list[Any], *, status: int | None = None, sent: int = 0) -> None:
        with self._lock:
            entry[2] = entry[2] if status is None else status
            entry[4] += sent

    def _end(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def _current_epoch(self) -> int:
        with self._lock:
            return self._epoch

    def _redirects_on(self) -> bool:
        with self._lock:
            return self._cdn_ttl is not None


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], proxy: FaultProxy):
        self.proxy = proxy
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up, and connections shut down by stop(), are business as usual.
        if isinstance(sys.exc_info()[1], OSError) or self.proxy._stopping.is_set():
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

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
                self._reply(canned.status, canned.headers, canned.body)
            elif cdn is not None:
                self._serve_cdn(cdn["digest"], query, epoch)
            elif blob is not None and self.command == "GET" and proxy._redirects_on():
                self._redirect(blob["name"], blob["digest"], path)
            elif blob is not None and self.command == "GET" and proxy._take_busy():
                self._busy()
            else:
                digest = blob["digest"] if blob is not None and self.command == "GET" else None
                self._forward(self.path, self._request_headers(), digest, epoch)
        except _Aborted:
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
            if key.lower() not in _HOP_BY_HOP:
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
            if lower in _HOP_BY_HOP or (cdn and lower.startswith("docker-")):
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
        self, resp: http.client.HTTPResponse, plan: _Plan | None, length: int | None
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
            _shutdown(self.connection)
        raise _Aborted

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
