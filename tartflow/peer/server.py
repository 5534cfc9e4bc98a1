"""``tartflow serve``: a read-only peer endpoint over this machine's Tart cache (starlette app,
served by uvicorn, both installed with Prefect).

Routes (every one but ``/v1/health`` needs ``Authorization: Bearer $TARTFLOW_PEER_TOKEN``,
else 401):

- ``GET /v1/layers/<uncompressed-content digest>``: a disk layer's decoded bytes, read from a
  cached VM's ``disk.img`` at the layer's offset (index.py says which layers qualify);
- ``GET /v1/blobs/<digest>``: a config or NVRAM blob, byte for byte;
- ``GET /v1/health``: 200, to see that the endpoint is up.

Both content routes take a single ``Range: bytes=START-[END]`` and answer 206 with
``Content-Range`` (416 for a range that is not satisfiable), 200 without one. With
``Accept: application/vnd.tartflow.zero-runs.v1`` the selected bytes come in the zero-run
representation (wire.py: runs of zeros are a 9-byte record), which is what tartflow's receivers
ask for; otherwise they come plain, for curl. ``Range`` always counts bytes of the content, not
of the encoded body. Anything unknown is 404 with no detail: a peer tells a stranger nothing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Iterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import TartflowError, UsageError
from ..tartcache import TartCache
from .index import CacheIndex, FoundLayer
from .token import ENV, current_token, token_matches
from .wire import ZERO_RUNS, encode_bytes, encode_file_range

__all__ = ["build_app", "parse_listen", "serve"]

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_READ = 1024 * 1024


def build_app(cache: TartCache, token: str) -> Starlette:
    if not token:
        raise UsageError(f"tartflow serve needs the fleet's shared token: set {ENV} (the same on every runner)")
    index = CacheIndex(cache)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def layer(request: Request) -> Response:
        if (denied := _deny(request, token)) is not None:
            return denied
        digest = request.path_params["digest"]
        found = await _in_thread(index.find_layer, digest) if _DIGEST.match(digest) else None
        if found is None:
            return _not_found()
        zero_runs = _wants_zero_runs(request)
        return _answer(request, found.size, lambda start, end: _layer_body(index, found, start, end, zero_runs))

    async def blob(request: Request) -> Response:
        if (denied := _deny(request, token)) is not None:
            return denied
        digest = request.path_params["digest"]
        data = await _in_thread(index.read_blob, digest) if _DIGEST.match(digest) else None
        if data is None:
            return _not_found()
        return _answer(request, len(data), lambda start, end: _bytes_body(data[start:end], _wants_zero_runs(request)))

    return Starlette(routes=[
        Route("/v1/health", health),
        Route("/v1/layers/{digest}", layer),
        Route("/v1/blobs/{digest}", blob),
    ])


async def _in_thread(function, digest: str):  # type: ignore[no-untyped-def]
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, digest)


def _deny(request: Request, token: str) -> Response | None:
    if token_matches(request.headers.get("authorization"), token):
        return None
    return PlainTextResponse("a peer token is required\n", status_code=401,
                             headers={"WWW-Authenticate": 'Bearer realm="tartflow-peer"'})


def _not_found() -> Response:
    return PlainTextResponse("not found\n", status_code=404)


def _wants_zero_runs(request: Request) -> bool:
    return ZERO_RUNS in request.headers.get("accept", "")


def _answer(request: Request, total: int, body) -> Response:  # type: ignore[no-untyped-def]
    """200 for the whole content, 206 for a satisfiable single range, else 416."""
    header = request.headers.get("range")
    start, end, status = 0, total, 200
    if header is not None:
        match = _RANGE.match(header.strip())
        if match is None or int(match[1]) >= max(total, 1) or (match[2] and int(match[2]) < int(match[1])):
            return PlainTextResponse("range not satisfiable\n", status_code=416,
                                     headers={"Content-Range": f"bytes */{total}"})
        start = int(match[1])
        end = min(total, int(match[2]) + 1) if match[2] else total
        status = 206
    headers = {"Accept-Ranges": "bytes"}
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
    zero_runs = _wants_zero_runs(request)
    if not zero_runs:
        headers["Content-Length"] = str(end - start)
    return StreamingResponse(body(start, end), status_code=status, headers=headers,
                             media_type=ZERO_RUNS if zero_runs else "application/octet-stream")


def _layer_body(index: CacheIndex, layer: FoundLayer, start: int, end: int, zero_runs: bool) -> Iterator[bytes]:
    """Runs in starlette's thread pool, one read at a time. The file is opened only once the
    body is wanted (and closed however it ends); if it changed since it was verified, the body
    ends short, which the receiver sees as a failed answer."""
    fd = index.open_layer(layer)
    if fd is None:
        return
    try:
        if zero_runs:
            yield from encode_file_range(fd, layer.offset + start, layer.offset + end)
            return
        position, stop = layer.offset + start, layer.offset + end
        while position < stop:
            data = os.pread(fd, min(_READ, stop - position), position)
            if not data:
                return
            yield data
            position += len(data)
    finally:
        os.close(fd)


def _bytes_body(data: bytes, zero_runs: bool) -> Iterator[bytes]:
    if zero_runs:
        yield from encode_bytes(data)
    else:
        yield data


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too); raise UsageError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen wants HOST:PORT, e.g. 0.0.0.0:8377, got {text!r}")
    return host, int(port)


def serve(listen: str, cache: TartCache | None = None) -> None:
    """Serve until SIGINT/SIGTERM. The socket is bound here, so a port in use is one clear line."""
    import uvicorn

    host, port = parse_listen(listen)
    app = build_app(cache or TartCache(), current_token() or "")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TartflowError(f"cannot listen on {listen}: {exc.strerror}; pick another address or port") from None
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    print(f"tartflow: serving Tart's cache at {cache.oci_root if cache else TartCache().oci_root} "
          f"to peers on http://{listen}", file=sys.stderr, flush=True)
    # uvicorn raises a signal it caught again once it has shut down; this handler takes it, so
    # SIGTERM or Ctrl+C is a clean stop (exit 0), not a death by signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    uvicorn.Server(config).run(sockets=[sock])
