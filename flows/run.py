"""Run the pull flow from the ``tartflow`` command, quietly.

By default the flow runs on Prefect's embedded ephemeral server (or on the server named by
``PREFECT_API_URL`` when one is configured). The terminal shows tartflow's progress, not
Prefect's log stream: Prefect's console handlers are silenced unless ``--verbose``, while its
logs still reach the flow run through the API; telemetry is off.
"""

from __future__ import annotations

import gc
import os

__all__ = ["quiet_prefect", "run_pull"]

_QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLI_PROMPT": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tartflow",
    # Prefect's client telemetry and its first-run notice: a tartflow user did not opt in to
    # Prefect; their own DO_NOT_TRACK setting, if any, wins.
    "DO_NOT_TRACK": "1",
}
#: Prefect's logging.yml can be overridden key by key from the environment; the console
#: handler is the only one that writes to the terminal.
_SILENT_CONSOLE = {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL"}


def quiet_prefect(verbose: bool) -> None:
    """Settings that must be in place before Prefect is imported."""
    for key, value in {**_QUIET_DEFAULTS, **({} if verbose else _SILENT_CONSOLE)}.items():
        os.environ.setdefault(key, value)


#: Either spelling of Prefect's flow heartbeat setting, as a user would set it.
_HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


def run_pull(
    reference: str, *, insecure: bool, concurrency: int, retry_for: float, verbose: bool,
    egress_limit: str | None = None, credentials_block: str | None = None,
) -> str:
    """Run ``pull-image`` in this process.

    Flow run heartbeats are off here unless the user sets Prefect's heartbeat frequency: they
    only feed an automation a user may have built to mark silent runs as crashed, and Prefect
    ends every run by waiting out its heartbeat thread's one-second sleep (0.5 s on average,
    a fifth of a cached re-pull). Deployment runs, started by workers, keep them.
    """
    quiet_prefect(verbose)
    from prefect.settings import temporary_settings

    from flows.pull import pull_image

    # Prefect's and pydantic's objects from the imports live as long as the process: out of
    # the collector's sight, they are not walked again by every collection that the
    # download's allocations set off (~0.4 s of CPU per 4 GiB pull here).
    gc.freeze()
    heartbeats = any(os.environ.get(name) for name in _HEARTBEAT_ENV)
    with temporary_settings(updates={} if heartbeats else {"flows.heartbeat_frequency": None}):
        return pull_image(
            reference=reference, insecure=insecure, concurrency=concurrency, retry_for=retry_for,
            egress_limit=egress_limit, credentials_block=credentials_block,
        )
