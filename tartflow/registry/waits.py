"""Every network wait bounded and interruptible: socket waits run in short slices.

httpx times single reads only, so a server that sends one byte a second holds a read forever,
and a blocked ``recv`` does not notice Ctrl+C. The registry clients therefore run on a network
backend (httpcore's own, wrapped) whose reads, writes and connects wait at most ``TICK`` seconds
at a time. Between slices it checks ``tartflow.cancel`` (a stop ends any wait within ``TICK``
seconds, as InterruptedPull) and the overall deadline set with :func:`deadline` for the current
thread (exceeding it is a read timeout, which the client reports as a temporary network error).
The per-read timeout httpx passes keeps its meaning: silence for that long is a stall.

A TLS handshake and a write are not sliced (neither can be resumed after a timeout); they stay
bounded by the connect and write timeouts. A connect is retried in attempts of a few seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpcore
import httpx

from .. import cancel

__all__ = ["MIN_EXCHANGE", "TICK", "budget", "deadline", "exchange", "transport"]

#: Longest single socket wait; Ctrl+C and overall deadlines are noticed within this.
TICK = 0.5

#: Shortest single connection attempt; Ctrl+C during a connect is noticed within this.
_CONNECT_SLICE = 3.0

#: Seconds a small exchange may always take, however little of a retry budget is left.
MIN_EXCHANGE = 10.0

_local = threading.local()
T = TypeVar("T")


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Network waits of this thread end ``seconds`` from now at the latest (nested: the earlier)."""
    previous: float | None = getattr(_local, "deadline", None)
    end = time.monotonic() + seconds
    _local.deadline = end if previous is None else min(previous, end)
    try:
        yield
    finally:
        _local.deadline = previous


@contextmanager
def budget(until: float) -> Iterator[None]:
    """Small exchanges of this thread (see :func:`exchange`) end by monotonic time ``until``,
    a retry loop's deadline, or ``MIN_EXCHANGE`` seconds after they start if that is later.
    Blob streams are not held to it: one attempt may rightly take longer than ``--retry-for``."""
    previous = getattr(_local, "budget", None)
    _local.budget = until
    try:
        yield
    finally:
        _local.budget = previous


@contextmanager
def exchange(seconds: float) -> Iterator[None]:
    """A deadline for one small exchange (a manifest, a token, an error body): ``seconds``, or
    less when the retry budget ends sooner."""
    until: float | None = getattr(_local, "budget", None)
    if until is not None:
        seconds = min(seconds, max(until - time.monotonic(), MIN_EXCHANGE))
    with deadline(seconds):
        yield


def _sliced(op: Callable[[float], T], timeout: float | None, timed_out: type[Exception]) -> T:
    """Call ``op(slice)`` until it returns; its ``timed_out`` means "nothing yet" until
    ``timeout`` or the thread's deadline has passed."""
    now = time.monotonic()
    stall = None if timeout is None else now + timeout
    while True:
        cancel.check()
        overall: float | None = getattr(_local, "deadline", None)
        ends = [t for t in (stall, overall) if t is not None]
        left = min(ends) - time.monotonic() if ends else TICK
        if left <= 0:
            which = "overall deadline" if overall is not None and overall <= (stall or overall) else "timeout"
            raise timed_out(f"no answer within the {which}")
        try:
            return op(min(TICK, left))
        except timed_out:
            continue


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return _sliced(lambda t: self._inner.read(max_bytes, t), timeout, httpcore.ReadTimeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # Not sliced: a send that timed out may have sent part of the buffer, and httpcore does
        # not say how much. Writes keep their own timeout; a stop is noticed before each one.
        cancel.check()
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        cancel.check()
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        # Each slice is a fresh connection attempt, long enough for any real handshake.
        def attempt(t: float) -> httpcore.NetworkStream:
            return self._inner.connect_tcp(host, port, max(t, _CONNECT_SLICE), local_address, socket_options)

        return _Stream(_sliced(attempt, timeout, httpcore.ConnectTimeout))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        cancel.sleep(seconds)


def transport(**kwargs: Any) -> httpx.HTTPTransport:
    """An httpx transport (``kwargs`` as for HTTPTransport) whose waits are sliced as above.

    httpx does not take a network backend, so it is set on the connection pool it builds; if a
    future httpx builds something else, the transport is returned unchanged (plain timeouts).
    """
    result = httpx.HTTPTransport(**kwargs)
    pool = getattr(result, "_pool", None)
    if isinstance(pool, httpcore.ConnectionPool):
        pool._network_backend = _Backend(pool._network_backend)
    return result
