"""Run the pull flow from the ``tartflow`` command, quietly.

By default the flow runs on Prefect's embedded ephemeral server (or on the server named by
``PREFECT_API_URL`` when one is configured). The terminal shows tartflow's progress, not
Prefect's log stream: Prefect's console handlers are silenced unless ``--verbose``, while its
logs still reach the flow run through the API; telemetry is off.
"""

from __future__ import annotations

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


def run_pull(
    reference: str, *, insecure: bool, concurrency: int, retry_for: float, verbose: bool,
    egress_limit: str | None = None, credentials_block: str | None = None,
) -> str:
    quiet_prefect(verbose)
    from flows.pull import pull_image

    return pull_image(
        reference=reference, insecure=insecure, concurrency=concurrency, retry_for=retry_for,
        egress_limit=egress_limit, credentials_block=credentials_block,
    )
