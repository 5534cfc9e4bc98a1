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

import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import threading
import time
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

from tests.support.faultplan import (
    AUTH_FAILED_BODY,
    BLOB_PATH,
    CDN_PATH,
    SERVER_BUSY_BODY,
    BodyFault,
    Canned,
    Plan,
    RequestRecord,
)
from tests.support.faultserver import ProxyServer, shutdown_socket

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
        self._server: ProxyServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._secret = secrets.token_bytes(32)
        self.reset_counters()
        self.clear_faults()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        server = ProxyServer(("127.0.0.1", self._port), self)
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
            shutdown_socket(conn)
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

    @property
    def arrivals(self) -> list[float]:
        """When each request of :attr:`requests` arrived (``time.monotonic()``), same order."""
        with self._lock:
            return list(self._arrivals)

    def reset_counters(self) -> None:
        """Count afresh from here, once no response is being sent. A client killed mid-body
        leaves its handler sending (and counting) one more chunk before the socket fails;
        that chunk belongs to the run before, not to the next count."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._active == 0, 10):
                raise AssertionError("fault proxy: a response was still being sent 10 s after its client left")
            self._blob_bytes = 0
            self._requests: list[list[Any]] = []
            self._arrivals: list[float] = []  # time.monotonic() of each request, as requests

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
            self._canned: list[Canned] = []
            self._body_faults: deque[BodyFault] = deque()
            self._flips: list[list[Any]] = []  # [digest, offset, remaining]
            self._cdn_ttl: float | None = None
            self._cdn_host: str | None = None
            self._grants: dict[str, str | None] = {}  # signature -> Authorization
            self._expire: dict[str, list[int]] = {}  # digest -> [grants to skip, grants to expire]
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
        retry_after: str | float | None = None,
        path_regex: str = BLOB_PATH,
        method: str = "*",
    ) -> None:
        """Answer the next ``count`` requests whose path matches with ``status`` and a
        distribution-spec error body (``TOOMANYREQUESTS`` for 429, ``UNAVAILABLE`` else).
        ``retry_after`` is sent verbatim (delay-seconds or an HTTP-date) when a string; a float
        is sent as the HTTP-date that many seconds after each answer goes out. This is an
        :meth:`override`, so it comes before every other fault, including CDN redirects."""
        code = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"
        message = "rate limit exceeded" if status == 429 else "service unavailable"
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if isinstance(retry_after, str):
            headers["Retry-After"] = retry_after
        self.override(method, path_regex, status, headers, body, count)
        if isinstance(retry_after, float):
            with self._lock:
                self._canned[-1].retry_after_in = retry_after

    def cut_after(self, nbytes: int, count: int = 1, *, reset: bool = False) -> None:
        """The next ``count`` blob body responses end after ``nbytes`` body bytes.
        cut, stall and short faults share one queue, used in the order they were set."""
        self._queue(count, BodyFault("cut", nbytes=nbytes, reset=reset))

    def stall_after(self, nbytes: int, seconds: float, count: int = 1, *, digest: str | None = None) -> None:
        """Send ``nbytes`` of the body, then nothing for ``seconds``, then close. With ``digest``,
        only responses for that blob stall (others pass the fault by)."""
        self._queue(count, BodyFault("stall", nbytes=nbytes, seconds=seconds, digest=digest))

    def short_content_length(self, count: int = 1, *, missing: int | None = None) -> None:
        """Declare the real Content-Length but close cleanly ``missing`` bytes early
        (default: after half the body)."""
        self._queue(count, BodyFault("short", missing=missing))

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

    def expire_grants(self, digest: str, count: int = 1, *, after: int = 0) -> None:
        """With :meth:`cdn_redirects` on: after ``after`` more redirects for ``digest``, hand out
        ``count`` signed URLs that have already expired, so the CDN answers them ``403
        AuthenticationFailed`` by its own signature check (a URL that expired in transit)."""
        with self._lock:
            self._expire[digest] = [after, count]

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
        entry = Canned(
            method.upper() if method != "*" else "*",
            re.compile(path_regex),
            status,
            list(headers.items()),
            body,
            count,
        )
        with self._lock:
            self._canned.append(entry)

    def _queue(self, count: int, fault: BodyFault) -> None:
        with self._lock:
            self._body_faults.extend(fault for _ in range(count))

    # -- used by the handler -----------------------------------------------------------------

    def _take_canned(self, method: str, path: str) -> Canned | None:
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

    def _plan(self, epoch: int, digest: str, start: int, length: int | None) -> Plan:
        with self._lock:
            plan = Plan(epoch, rate=self._rate)
            fault = next((f for f in self._body_faults if f.digest in (None, digest)), None)
            if fault is not None:
                self._body_faults.remove(fault)
                plan.fault = fault
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

    def _reserve(self, plan: Plan, size: int) -> tuple[int, bool]:
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
            ttl, pending = self._cdn_ttl, self._expire.get(digest)
            if pending is not None and pending[0] > 0:
                pending[0] -= 1
            elif pending is not None and pending[1] > 0:
                pending[1] -= 1
                ttl = -1.0
            expiry = f"{time.time() + ttl:.3f}"
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
                shutdown_socket(conn)
            else:
                self._conns[conn] = threading.current_thread()

    def _begin(self, method: str, path: str, range_: str | None) -> list[Any]:
        with self._lock:
            entry = [method, path, 0, range_, 0]
            self._requests.append(entry)
            self._arrivals.append(time.monotonic())
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

