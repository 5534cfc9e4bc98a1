"""A hostile registry stand-in: one real HTTP(S) server on 127.0.0.1 that misbehaves on purpose.

Routes are (method, path regex) -> action, checked in the order added; every request is logged
with its headers (``seen``), so tests can say what reached the server, credentials included.
Actions cover what an audit of a hostile registry tries: :func:`hang` (never answer),
:func:`endless` (a huge body, e.g. a "token" of a GiB), :func:`trickle` (one byte at a time),
:func:`reply` (any status, headers and body: 401 challenges with a realm anywhere, redirects
and ``Location`` rewriting, a Basic-auth mirror). stdlib HTTP in a thread, like tokenserver.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["HostileServer", "Seen", "ended_within", "endless", "hang", "reply", "trickle"]

Action = Callable[["_Handler"], None]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # with its query string
    headers: dict[str, str]  # lower-cased names


class HostileServer:
    """``certfile``/``keyfile``: serve https (e.g. from tests.support.tls) instead of http."""

    def __init__(self, certfile: Path | None = None, keyfile: Path | None = None) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Action]] = []
        self.seen: list[Seen] = []
        self.sent: dict[str, int] = {}  # path -> body bytes written by endless/trickle
        self.stopping = threading.Event()
        self._tls = (certfile, keyfile) if certfile and keyfile else None
        self._http: ThreadingHTTPServer | None = None

    def on(self, method: str, pattern: str, action: Action) -> Self:
        self.routes.append((method, re.compile(pattern), action))
        return self

    def start(self) -> Self:
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._http.daemon_threads = True
        if self._tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self._tls)
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
        self._http.hostile = self  # type: ignore[attr-defined]
        threading.Thread(target=self._http.serve_forever, name="hostile-server", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def host(self) -> str:
        assert self._http is not None
        return f"127.0.0.1:{self._http.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}"

    def requests(self, pattern: str = "") -> list[Seen]:
        return [s for s in self.seen if re.search(pattern, s.path)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    @property
    def hostile(self) -> HostileServer:
        return self.server.hostile  # type: ignore[attr-defined, no-any-return]

    def _dispatch(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        hostile = self.hostile
        hostile.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        for method, pattern, action in hostile.routes:
            if method == self.command and pattern.search(self.path.split("?", 1)[0]):
                try:
                    action(self)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    self.close_connection = True
                return
        reply(404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        pass


def reply(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Action:
    def action(handler: _Handler) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)
    return action


def hang(handler: _Handler) -> None:
    """Read the request, then never answer (until the server stops)."""
    handler.hostile.stopping.wait(600)
    handler.close_connection = True


def _count(handler: _Handler, n: int) -> None:
    path = handler.path.split("?", 1)[0]
    handler.hostile.sent[path] = handler.hostile.sent.get(path, 0) + n


def endless(size: int, content_type: str = "application/json") -> Action:
    """A 200 whose body is ``size`` bytes of JSON-ish filler, written as fast as it is read."""
    def action(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        chunk = b'{"token":"' + b"x" * (65536 - 10)
        left = size
        while left > 0 and not handler.hostile.stopping.is_set():
            piece = chunk[: min(left, len(chunk))]
            handler.wfile.write(piece)
            _count(handler, len(piece))
            left -= len(piece)
        handler.close_connection = True
    return action


def trickle(size: int, every: float, content_type: str = "application/vnd.oci.image.manifest.v1+json") -> Action:
    """A 200 of ``size`` bytes sent one byte per ``every`` seconds: never silent for long."""
    def action(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        for _ in range(size):
            if handler.hostile.stopping.wait(every):
                break
            handler.wfile.write(b" ")
            handler.wfile.flush()
            _count(handler, 1)
        handler.close_connection = True
    return action


def ended_within(seconds: float, fn: Callable[[], object]) -> tuple[float, object]:
    """Run ``fn`` in a daemon thread: (elapsed, result or the exception it raised); an
    AssertionError if it has not ended after ``seconds`` (the thread is left to its fate)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # handed to the test as the outcome
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), f"still waiting after {elapsed:.0f} s"
    return elapsed, outcome[0]
