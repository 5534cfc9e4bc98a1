"""A simulated fleet against one Prefect server: the machinery behind ``tests/test_scale.py`` and
``python -m benchmarks.scale``.

:class:`ScaleServer` is a ``prefect server`` (on PostgreSQL from :mod:`tests.support.postgres`,
or on SQLite) whose load can be read at any moment as :class:`Counters`: CPU seconds of the
server's and the database's process trees (``/proc/<pid>/stat``, exited children included),
API requests from uvicorn's access log, rows written from ``pg_stat_user_tables``.
:func:`run_wave` starts N :mod:`tests.support.scalerunner` processes, each with its own
``TART_HOME``, lets them pull at the same moment and collects what each client saw. Counts
(task runs, requests, rows) do not depend on how busy the machine is; seconds do.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import proctree
from tests.support.postgres import Postgres, start_postgres
from tests.support.prefectserver import PrefectServer, prefect_env
from tests.support.taskruns import task_runs_of

__all__ = ["Counters", "RunnerResult", "ScaleServer", "Wave", "percentile", "run_wave", "tree_cpu"]

CHECKOUT = Path(__file__).resolve().parents[2]
EGRESS_LIMIT = "tartflow-egress"  # the name flows/pull.py uses; not imported: no Prefect here
_ACCESS = re.compile(r'uvicorn\.access - \S+ - "(\w+) (\S+) HTTP/[\d.]+" (\d+)')
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants, including their reaped children."""
    return proctree.tree_cpu(pid) or 0.0


def route(path: str) -> str:
    """An API path with ids folded, so requests group by endpoint."""
    return _UUID.sub("{id}", path.split("?", 1)[0])


@dataclass
class Counters:
    at: float
    server_cpu: float
    db_cpu: float | None
    requests: Counter[tuple[str, str, int]]
    rows: int | None
    rows_by_table: dict[str, int]

    def minus(self, before: Counters) -> Counters:
        rows = None if self.rows is None or before.rows is None else self.rows - before.rows
        db = None if self.db_cpu is None or before.db_cpu is None else self.db_cpu - before.db_cpu
        tables = {t: n - before.rows_by_table.get(t, 0) for t, n in self.rows_by_table.items()}
        return Counters(self.at - before.at, self.server_cpu - before.server_cpu, db,
                        self.requests - before.requests, rows, {t: n for t, n in tables.items() if n})

    @property
    def request_count(self) -> int:
        return sum(self.requests.values())


class ScaleServer:
    """A Prefect server for load measurements; ``database`` is ``"postgres"`` or ``"sqlite"``."""

    def __init__(self, root: Path, database: str = "postgres", postgres: Postgres | None = None,
                 server_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.database = database
        self._own_pg = postgres is None and database == "postgres"
        self.pg = (start_postgres() if self._own_pg else postgres) if database == "postgres" else None
        try:
            home = root / "server"
            home.mkdir(parents=True, exist_ok=True)
            self.prefect = PrefectServer(home, database_url=self.pg.url if self.pg else None, access_log=True,
                                         extra_env=server_env)
        except BaseException:
            if self._own_pg and self.pg:
                self.pg.stop()
            raise
        self.api_url = self.prefect.api_url

    def client_env(self, home: Path) -> dict[str, str]:
        """Environment of a runner: its own TART_HOME and Prefect home, this server's API."""
        env = prefect_env(home / "prefect", self.api_url)
        env.update(TART_HOME=str(home / "tart"), TARTFLOW_SPACE_MARGIN="0", DO_NOT_TRACK="1",
                   PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="CRITICAL", PYTHONPATH=str(CHECKOUT))
        env.pop("TARTFLOW_HOME", None)
        return env

    def requests(self) -> Counter[tuple[str, str, int]]:
        found: Counter[tuple[str, str, int]] = Counter()
        with open(self.prefect.log_path, errors="replace") as log:
            for line in log:
                match = _ACCESS.search(line)
                if match:
                    found[(match[1], route(match[2]), int(match[3]))] += 1
        return found

    def counters(self, settle: bool = True) -> Counters:
        """Now's totals; ``settle`` waits until PostgreSQL has published its row counts."""
        rows, tables = None, {}
        if self.pg:
            rows = self.pg.settled_rows_written() if settle else self.pg.rows_written()
            out = self.pg.psql("SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables")
            tables = {name: int(n) for name, n in (line.split("|") for line in out.splitlines() if line)}
        return Counters(time.monotonic(), tree_cpu(self.prefect.pid), tree_cpu(self.pg.pid) if self.pg else None,
                        self.requests(), rows, tables)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, f"{self.api_url}{path}", json=body, timeout=60)
        response.raise_for_status()
        return response.json() if response.content else None

    def ensure_egress_limit(self, slots: int) -> None:
        """The fleet's global concurrency limit, as ``deployments.fleet setup`` creates it."""
        response = httpx.post(f"{self.api_url}/v2/concurrency_limits/", timeout=60,
                              json={"name": EGRESS_LIMIT, "limit": slots})
        if response.status_code not in (200, 201, 409):
            response.raise_for_status()

    def flow_run_states(self, ids: list[str]) -> dict[str, str]:
        runs = self.api("POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}, "limit": 200})
        return {run["id"]: (run["state"] or {}).get("type", "NONE") for run in runs}

    def task_runs(self, ids: list[str]) -> Counter[str]:
        """Task runs of these flow runs, by task name (read back from the API; the run
        ``fetch-layer-a1b`` counts as ``fetch-layer``)."""
        return Counter(run["name"].rsplit("-", 1)[0] for run in task_runs_of(self.api_url, ids))

    def stop(self) -> None:
        self.prefect.stop()
        if self._own_pg and self.pg:
            self.pg.stop()


@dataclass
class RunnerResult:
    home: Path
    code: int
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.data.get("state") == "COMPLETED"


@dataclass
class Wave:
    runners: list[RunnerResult]
    wall: float  # from the go signal until the last runner finished

    @property
    def latencies(self) -> list[float]:
        return sorted(r[3] for runner in self.runners for r in runner.data.get("requests", []))

    @property
    def flow_run_ids(self) -> list[str]:
        return [r.data["flow_run_id"] for r in self.runners if r.data.get("flow_run_id")]

    @property
    def cpu(self) -> float:
        return sum(r.data.get("cpu", 0.0) for r in self.runners)


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_wave(server: ScaleServer, reference: str, homes: list[Path], *, mode: str = "prefect",
             timeout: float = 600) -> Wave:
    """N runners (one per home) pull ``reference`` together; every process is gone on return."""
    wave_dir = homes[0].parent / f"wave-{uuid.uuid4().hex[:8]}"
    wave_dir.mkdir(parents=True)
    go = wave_dir / "go"
    procs: list[tuple[Path, Path, subprocess.Popen[bytes]]] = []
    try:
        for index, home in enumerate(homes):
            home.mkdir(parents=True, exist_ok=True)
            result = wave_dir / f"runner-{index}.json"
            spec = wave_dir / f"runner-{index}.spec"
            spec.write_text(json.dumps({"mode": mode, "reference": reference, "result": str(result),
                                        "go": str(go), "wait": timeout}))
            with open(wave_dir / f"runner-{index}.log", "wb") as log:
                procs.append((home, result, subprocess.Popen(
                    [sys.executable, "-m", "tests.support.scalerunner", str(spec)], cwd=CHECKOUT,
                    env=server.client_env(home), stdout=log, stderr=subprocess.STDOUT)))
        deadline = time.monotonic() + timeout
        while not all(r.with_suffix(".ready").exists() or p.poll() is not None for _, r, p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"runners not ready within {timeout:.0f} s")
            time.sleep(0.05)
        go.touch()
        started = time.time()
        results = []
        for home, result, proc in procs:
            code = proc.wait(max(1.0, deadline - time.monotonic()))
            data = json.loads(result.read_text()) if result.exists() else {}
            if not data:
                log_tail = result.with_suffix(".log").read_text(errors="replace")[-800:]
                data = {"state": "CRASHED", "error": f"runner exited {code} without a result: {log_tail}"}
            results.append(RunnerResult(home, code, data))
        ended = max((r.data.get("ended", started) for r in results), default=started)
        return Wave(results, ended - started)
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
