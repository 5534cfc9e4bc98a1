"""The text table ``python -m benchmarks.scale`` prints, from its raw results."""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["render"]


def _f(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _task_total(row: dict[str, Any]) -> int:
    return sum(row["task_runs"].values())


def _per_pull(db: dict[str, Any]) -> list[str]:
    lines = [
        "| layers | task runs | flow runs ok | API requests | req/task run | server CPU s | ms/task run "
        "| DB CPU s | rows written | rows/task run | client CPU s | core-only CPU s | Prefect share |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in db["per_pull"]:
        tasks, server = _task_total(row), row["server"]
        share = None
        if row.get("core_cpu") is not None and row["client_cpu"] > 0:
            share = (row["client_cpu"] - row["core_cpu"]) / row["client_cpu"]
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(row["task_runs"].items()))
        lines.append(
            f"| {row['layers']} | {tasks} ({kinds}) | {row['states'].get('COMPLETED', 0)} | {server['requests']} "
            f"| {_f(server['requests'] / tasks if tasks else None, '.1f')} | {_f(server['server_cpu'])} "
            f"| {_f(server['server_cpu'] * 1000 / tasks if tasks else None, '.0f')} | {_f(server['db_cpu'])} "
            f"| {_f(server['rows'], 'd') if server['rows'] is not None else '-'} "
            f"| {_f(server['rows'] / tasks if tasks and server['rows'] is not None else None, '.1f')} "
            f"| {_f(row['client_cpu'])} | {_f(row.get('core_cpu'))} | {_f(share * 100 if share is not None else None, '.0f')}% |"
        )
    return lines


def _waves(db: dict[str, Any]) -> list[str]:
    lines = [
        "| runners | layers | ok / failed | wall s | server CPU s | server busy | DB CPU s | API requests "
        "| p50 ms | p99 ms | max ms | non-2xx | rows written |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in db["waves"]:
        server = row["server"]
        odd = {k: v for k, v in server["by_status"].items() if not k.startswith("2")}
        lines.append(
            f"| {row['runners']} | {row['layers']} | {row['states'].get('COMPLETED', 0)} / {row['failed']} "
            f"| {_f(row['wall'], '.1f')} | {_f(server['server_cpu'], '.1f')} "
            f"| {_f(server['server_cpu'] / row['wall'] * 100 if row['wall'] else None, '.0f')}% "
            f"| {_f(server['db_cpu'], '.1f')} | {server['requests']} | {_ms(row['p50'])} | {_ms(row['p99'])} "
            f"| {_ms(row['max'])} | {', '.join(f'{k}: {v}' for k, v in odd.items()) or '-'} "
            f"| {server['rows'] if server['rows'] is not None else '-'} |"
        )
    return lines


def _breakdown(db: dict[str, Any]) -> list[str]:
    if not db["per_pull"]:
        return []
    row = max(db["per_pull"], key=lambda r: r["layers"])
    tasks = _task_total(row) or 1
    lines = [f"Requests of one {row['layers']}-layer pull by endpoint (per task run):", ""]
    lines += [f"    {n:6d} ({n / tasks:5.2f})  {r}" for r, n in list(row["server"]["by_route"].items())[:15]]
    if row["server"]["rows_by_table"]:
        lines += ["", "Rows written by table (per task run):", ""]
        lines += [f"    {n:6d} ({n / tasks:5.2f})  {t}" for t, n in list(row["server"]["rows_by_table"].items())[:10]]
    return lines


def render(results: dict[str, Any]) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = [
        "# tartflow fleet scale",
        "",
        f"{platform.platform()}, {os.cpu_count()} CPUs, load average at the end {_f(load, '.1f')}; "
        f"took {results.get('seconds', 0):.0f} s. Counts do not depend on load; seconds and "
        "latencies do.",
        "",
    ]
    for db in results["databases"]:
        out += [f"## {db['database']}", ""]
        if "skipped" in db:
            out += [f"skipped: {db['skipped']}", ""]
            continue
        idle = db.get("idle")
        if idle:
            out += [f"Idle server: {idle['server_cpu'] / idle['seconds']:.3f} CPU s/s, "
                    f"{(idle['rows'] or 0) / idle['seconds']:.1f} rows/s, "
                    f"{idle['requests']} requests in {idle['seconds']:.0f} s (included in the figures below).", ""]
        out += ["### One pull, one runner", "", *_per_pull(db), "", "### Runners pulling at once", "", *_waves(db), ""]
        workers = db.get("workers")
        if workers:
            out += [f"Idle workers: {workers['per_worker_per_minute']:.1f} API requests per worker per minute "
                    f"({workers['requests']} from {workers['workers']} workers in {workers['seconds']:.0f} s: "
                    + ", ".join(f"{r} {n}" for r, n in list(workers["by_route"].items())[:4]) + ")", ""]
        out += [*_breakdown(db), ""]
    return "\n".join(out)
