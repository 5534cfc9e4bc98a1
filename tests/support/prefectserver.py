"""A real ``prefect server start`` on a loopback port, for tests that run tartflow as a user or
a fleet would (each CLI process then skips starting an ephemeral server of its own).

By default the server keeps its database in SQLite under ``home``; pass ``database_url`` (as
``PREFECT_API_DATABASE_CONNECTION_URL`` takes it, e.g. from :mod:`tests.support.postgres`) to
run it on PostgreSQL, as a fleet does. ``access_log=True`` keeps uvicorn's access log (one line
per API request) in ``server.log``, which :mod:`tests.support.fleetsim` counts; ``extra_env``
adds server settings (``PREFECT_SERVER_...``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.registry import free_port

__all__ = ["PrefectServer", "prefect_env"]


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment for a Prefect client or server kept entirely inside ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


class PrefectServer:
    def __init__(self, home: Path, *, database_url: str | None = None, access_log: bool = False,
                 extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.database_url = database_url
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self._log = open(home / "server.log", "wb")  # noqa: SIM115 - held open for the server's lifetime
        prefect = Path(sys.executable).with_name("prefect")
        env = prefect_env(home)
        if database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        if access_log:
            env.update(PREFECT_SERVER_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1")
        env.update(extra_env or {})
        self._proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("prefect server did not answer /api/health within 90 s")

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
