"""A throwaway PostgreSQL on loopback, for a Prefect server backed by the database a fleet runs.

Debian's ``postgresql`` package (``apt-get install postgresql``, which ``scripts/setup.sh``
does) provides the binaries under ``/usr/lib/postgresql/<major>/bin``; the system cluster it
may also start is left alone. PostgreSQL refuses to run as root, so under root the server runs
as the unprivileged ``postgres`` user, in a data directory of its own inside a
fresh temporary directory that user owns (outside pytest's root-only ``tmp_path``); the
child process switches user itself, so the postmaster is the process this module started and
signals reach it directly. It listens
on 127.0.0.1 only, on a free port, with its unix socket in that same directory, and trusts
loopback connections: the database holds nothing but a test's flow runs. :meth:`Postgres.stop`
stops the server (fast shutdown, then SIGKILL), waits until no process of it is left and removes
the whole directory.

Counters for the scale benchmark: :meth:`Postgres.rows_written` sums ``n_tup_ins + n_tup_upd +
n_tup_del`` over ``pg_stat_user_tables``. PostgreSQL 15 publishes a backend's counts when the
backend is idle (within ~1 s) or at most every 60 s while busy, so read it after the clients
quieted down (:meth:`Postgres.settled_rows_written`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tests.support.registry import free_port

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Postgres", "PostgresUnavailable", "find_postgres_bin", "start_postgres"]

BIN_ENV = "TARTFLOW_POSTGRES_BIN"  # a directory holding initdb, postgres and psql
DATABASE = "prefect"
_SERVICE_USER = "postgres"
_START_TIMEOUT = 60.0


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed here, or could not be started (the message says which)."""


def find_postgres_bin() -> Path:
    """``$TARTFLOW_POSTGRES_BIN``, else the newest ``/usr/lib/postgresql/<major>/bin`` (Debian),
    else the directory of ``initdb`` on ``PATH``."""
    candidates = []
    if os.environ.get(BIN_ENV):
        candidates.append(Path(os.environ[BIN_ENV]))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        majors = sorted((p for p in debian.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True)
        candidates.extend(p / "bin" for p in majors)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if all((directory / tool).is_file() for tool in ("initdb", "postgres", "psql")):
            return directory
    raise PostgresUnavailable(
        "PostgreSQL is not installed: run `apt-get install postgresql` (scripts/setup.sh does), "
        f"or point {BIN_ENV} at a directory holding initdb, postgres and psql"
    )


def _as_service_user() -> dict[str, Any]:
    """Popen arguments that run the server unprivileged: as ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(_SERVICE_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no {_SERVICE_USER!r} user to run PostgreSQL as "
            "(PostgreSQL refuses root): install Debian's postgresql package"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
            "env": {**os.environ, "HOME": entry.pw_dir, "USER": _SERVICE_USER, "LOGNAME": _SERVICE_USER}}


class Postgres:
    """A running PostgreSQL cluster; leave the ``with`` block or call :meth:`stop` to remove it."""

    def __init__(self, bindir: Path, root: Path, port: int, process: subprocess.Popen[bytes]):
        self.bindir = bindir
        self.root = root
        self.port = port
        self.process = process

    @property
    def pid(self) -> int:
        """The postmaster; every backend is its child."""
        return self.process.pid

    @property
    def url(self) -> str:
        """What ``PREFECT_API_DATABASE_CONNECTION_URL`` takes."""
        return f"postgresql+asyncpg://{_SERVICE_USER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def psql(self, sql: str, database: str = DATABASE) -> str:
        """Run one statement over loopback; returns the unaligned, tuples-only output."""
        done = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", _SERVICE_USER, "-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def rows_written(self) -> int:
        """Rows inserted, updated and deleted in user tables since the cluster started, as
        published so far (see the module docstring)."""
        out = self.psql("SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables")
        return int(out or 0)

    def settled_rows_written(self, quiet: float = 1.5, limit: float = 20.0) -> int:
        """:meth:`rows_written` once three readings ``quiet`` seconds apart agree (or after
        ``limit`` seconds): idle backends have published what they wrote by then, and the
        Prefect server has recorded the events its clients sent last."""
        deadline = time.monotonic() + limit
        last, same = self.rows_written(), 0
        while time.monotonic() < deadline and same < 2:
            time.sleep(quiet)
            now = self.rows_written()
            same = same + 1 if now == last else 0
            last = now
        return last

    def running_pids(self) -> list[int]:
        """Processes of this cluster still running: the postmaster and every backend or helper,
        each of which works in the data directory (its cwd)."""
        data = str(self.root / "data")
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                postmaster = int(entry.name) == self.pid and self.process.poll() is None
                if postmaster or os.readlink(Path(entry.path, "cwd")).startswith(data):
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint, exit), SIGKILL after 20 s, then
        remove the directory. Calling it again does nothing."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        # Backends exit right after the postmaster; wait for them before removing their files.
        deadline = time.monotonic() + 10
        while self.running_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.running_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_postgres(*, shared_buffers: str = "128MB", max_connections: int = 200) -> Postgres:
    """initdb a new cluster in a fresh temporary directory, start it on 127.0.0.1, create the
    ``prefect`` database. Raises :class:`PostgresUnavailable` when that cannot be done here.

    ``max_connections`` is above Prefect's default pool (5 + 10 overflow per server process)
    times the few servers a test runs; fsync stays on, as on a real server.
    """
    bindir = find_postgres_bin()
    as_user = _as_service_user()
    root = Path(tempfile.mkdtemp(prefix="tartflow-pg-"))
    try:
        if as_user:
            os.chown(root, as_user["user"], as_user["group"])
        data = root / "data"
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", _SERVICE_USER, "--auth=trust",
             "--encoding=UTF8", "--no-instructions"],
            capture_output=True, text=True, timeout=120, cwd=root, **as_user,
        )
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(init.stderr or init.stdout).strip()[-1000:]}")
        port = free_port()
        log = open(root / "postgres.log", "wb")  # noqa: SIM115 - the server's output for its lifetime
        with log:
            process = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                 "-k", str(root), "-c", f"shared_buffers={shared_buffers}",
                 "-c", f"max_connections={max_connections}", "-c", "track_counts=on"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                start_new_session=True, **as_user,
            )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    server = Postgres(bindir, root, port, process)
    try:
        _wait_ready(server)
        server.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: Postgres) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise PostgresUnavailable(f"postgres exited with status {server.process.returncode}: "
                                      f"{server.log_path.read_text(errors='replace')[-1500:]}")
        ready = subprocess.run([str(server.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(server.port)],
                               capture_output=True, timeout=30)
        if ready.returncode == 0:
            return
        time.sleep(0.2)
    raise PostgresUnavailable(f"postgres did not accept connections within {_START_TIMEOUT:.0f} s: "
                              f"{server.log_path.read_text(errors='replace')[-1500:]}")
