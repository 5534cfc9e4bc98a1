"""A misbehaving peer: an HTTP proxy in front of a real ``tartflow serve`` that passes answers on,
or lies, cuts or stalls them on demand, and records what it was asked. Stdlib only.

Modes (``mode`` may be changed while it runs):

- ``pass``: every request and answer unchanged;
- ``garbage``: the real answer's status and headers, but a well-formed zero-run body of random
  bytes of the length asked for (only a digest check can tell);
- ``liar``: ``garbage`` for disk layers only, config and NVRAM passed on unchanged;
- ``cut``: the real body of the first layer asked for until ``after`` bytes of it, then the
  connection closes; ``then`` is the mode for later requests (``die``: the listening socket
  closes too, like a killed peer);
- ``stall``: the real headers and ``after`` bytes of every layer's body, then silence until
  stopped.

``cut`` and ``stall`` pass config and NVRAM requests on unchanged.
"""

from __future__ import annotations

import http.client
import os
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["BadPeer"]

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


class BadPeer:
    def __init__(self, upstream: str, mode: str = "pass", *, after: int = 0, then: str = "pass") -> None:
        self.upstream = urlsplit(upstream).netloc
        self.mode, self.after, self.then = mode, after, then
        self.ranges: list[str | None] = []  # Range header of every layer request, in order
        self.paths: list[str] = []  # every request's path, in order
        self.stopped = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> BadPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if not self.stopped.is_set():
            self.stopped.set()
            self._server.shutdown()
            self._server.server_close()

    def die(self) -> None:
        """Stop answering at all: the listening socket closes, connections are refused."""
        threading.Thread(target=self.stop, daemon=True).start()


def _handler(peer: BadPeer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            layer = self.path.startswith("/v1/layers/")
            peer.paths.append(self.path)
            if layer:
                peer.ranges.append(self.headers.get("Range"))
            mode = peer.mode
            if mode == "liar":
                mode = "garbage" if layer else "pass"
            if mode in ("cut", "stall") and not layer:  # config and NVRAM are too small to cut
                mode = "pass"
            if mode == "cut":
                peer.mode = peer.then
            upstream = http.client.HTTPConnection(peer.upstream, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            upstream.request("GET", self.path, headers=headers)
            answer = upstream.getresponse()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in _HOP:
                    self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if mode == "garbage" and answer.status in (200, 206):
                self._garbage(answer)
            else:
                self._relay(answer, peer.after if mode in ("cut", "stall") else None)
                if mode == "stall":
                    peer.stopped.wait(120)
                if mode == "cut" and peer.then == "die":
                    peer.die()
            upstream.close()

        def _relay(self, answer: http.client.HTTPResponse, limit: int | None) -> None:
            sent = 0
            while limit is None or sent < limit:
                data = answer.read1(65536 if limit is None else min(65536, limit - sent))
                if not data:
                    break
                self.wfile.write(data)
                self.wfile.flush()
                sent += len(data)

        def _garbage(self, answer: http.client.HTTPResponse) -> None:
            span = answer.getheader("Content-Range", "")
            start, _, rest = span.removeprefix("bytes ").partition("-")
            length = int(rest.split("/")[0]) - int(start) + 1 if span else len(answer.read())
            while length > 0:
                n = min(length, 1 << 20)
                self.wfile.write(struct.pack("<cQ", b"D", n) + os.urandom(n))
                length -= n

    return Handler
