"""A real OCI registry (CNCF distribution, ``docker-registry``) on loopback for tests.

tartflow's tests speak the real protocol, Range requests and all, so they run the same server
the Debian package ``docker-registry`` ships (``apt-get install docker-registry``), not a mock.

The configuration is written as JSON, which is valid YAML, so no YAML library is needed.
Config reference: https://distribution.github.io/distribution/about/configuration/
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "Registry",
    "RegistryStartError",
    "deep_merge",
    "find_registry_binary",
    "free_port",
    "start_registry",
]

BINARY_ENV = "TARTFLOW_REGISTRY_BIN"
_BINARY_NAMES = ("docker-registry", "registry")
_START_TIMEOUT = 20.0
_START_ATTEMPTS = 3


class RegistryStartError(RuntimeError):
    """The registry binary is missing, or the server died or never answered ``GET /v2/``."""


def find_registry_binary() -> str:
    """Path of the registry server: ``$TARTFLOW_REGISTRY_BIN``, else ``docker-registry`` or
    ``registry`` on ``PATH``."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise RegistryStartError(f"{BINARY_ENV}={explicit!r} is not an executable file")
        return found
    for name in _BINARY_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    raise RegistryStartError(
        "no OCI registry server found: run `apt-get install docker-registry` "
        f"(CNCF distribution), or point {BINARY_ENV} at a `registry` binary"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller may still lose a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``extra`` merged in.

    Nested dicts merge, a ``None`` value removes the key (to swap a storage driver, say), and
    anything else replaces.
    """
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def base_config(storage: Path, port: int) -> dict[str, Any]:
    """Filesystem storage, deletes enabled, quiet logs, no auth, listening on 127.0.0.1:port."""
    return {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }


class Registry:
    """A running registry process; stop it with :meth:`stop` or by leaving a ``with`` block."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, root: Path, log: Path):
        self.process = process
        self.port = port
        self.root = root
        self.log_path = log

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yml"

    def log_text(self) -> str:
        """What the server wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Terminate the server and wait for it; calling it again does nothing."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Registry(url={self.url!r}, root={str(self.root)!r})"


def start_registry(
    root: Path, *, extra_config: dict[str, Any] | None = None, port: int | None = None
) -> Registry:
    """Start ``<registry> serve <root>/config.yml`` and wait until ``GET /v2/`` answers.

    Blobs live under ``root/storage``; the server's output goes to ``root/registry.log``.
    ``extra_config`` is deep-merged into the configuration (``{"auth": {"htpasswd": ...}}``,
    ``{"proxy": {"remoteurl": ...}}``). With ``port=None`` a free port is picked, and picked
    again if another process takes it first. Any HTTP answer to ``/v2/`` counts as ready, so a
    registry configured with auth (401) starts too.
    """
    binary = find_registry_binary()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "storage").mkdir(exist_ok=True)
    attempts = 1 if port is not None else _START_ATTEMPTS
    error: RegistryStartError | None = None
    for _ in range(attempts):
        try:
            return _start_once(binary, root, extra_config or {}, port or free_port())
        except RegistryStartError as exc:
            error = exc
            if "address already in use" not in str(exc):
                raise
    assert error is not None
    raise error


def _start_once(binary: str, root: Path, extra: dict[str, Any], port: int) -> Registry:
    config = deep_merge(base_config(root / "storage", port), extra)
    config_path = root / "config.yml"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    log_path = root / "registry.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, "serve", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    registry = Registry(process, port, root, log_path)
    try:
        _wait_ready(registry)
    except BaseException:
        registry.stop()
        raise
    return registry


def _wait_ready(registry: Registry) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    last_error = ""
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            code = registry.process.poll()
            if code is not None:
                raise RegistryStartError(
                    f"registry exited with status {code} before answering "
                    f"(config {registry.config_path}):\n{registry.log_text()}"
                )
            try:
                client.get(f"{registry.url}/v2/")
                return
            except httpx.TransportError as exc:
                last_error = repr(exc)
            time.sleep(0.05)
    raise RegistryStartError(
        f"registry did not answer GET {registry.url}/v2/ within {_START_TIMEOUT:.0f} s "
        f"(last error {last_error}; config {registry.config_path}):\n{registry.log_text()}"
    )
