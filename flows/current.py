"""The ``tartflow pull`` answer for an image already current in Tart's cache, without Prefect.

On a machine with no Prefect server configured, a pull would start Prefect's ephemeral
server (seconds) only to find nothing to do; CI jobs pull at every start. So the command first
asks the core (``tartflow.current``: one manifest request, no Prefect import) and, when the
image is current, refreshes its access time and answers. With a Prefect API configured (a
fleet runner: ``PREFECT_API_URL`` in the environment or in the active Prefect profile), or
with a credentials block (which only Prefect can read), the flow always runs, so the fleet's
record of pulls stays whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from tartflow.context import PullContext, PullSettings
from tartflow.current import CurrentImage, if_current
from tartflow.progress import reporter

__all__ = ["answer_if_current", "prefect_api_configured"]


def prefect_api_configured() -> bool:
    """True when Prefect would talk to a server rather than start an ephemeral one."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    try:
        text = profiles.read_text()
    except OSError:
        return False
    try:
        import tomllib
    except ImportError:  # Python 3.10: any mention counts, so the flow runs (the safe side)
        return "PREFECT_API_URL" in text
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:  # Prefect will complain itself; let the flow run
        return True
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return bool(data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"))


def answer_if_current(reference: str, *, insecure: bool, retry_for: float) -> CurrentImage | None:
    """The current image (told to the reporter as a start with nothing to fetch), else None."""
    settings = PullSettings.from_env(insecure=insecure, retry_for=retry_for)
    found = if_current(PullContext.build(settings), reference)
    if found is not None:
        reporter().started(found.reference, found.digest, found.compressed_size, found.disk_size, 0)
    return found
