"""Run the ``tartflow`` console script as a user would: a real process, real signals."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.prefectserver import prefect_env

__all__ = ["Tartflow", "command"]


def command() -> list[str]:
    script = Path(sys.executable).with_name("tartflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]


@dataclass
class Tartflow:
    """A user's machine: its own TART_HOME, talking to one Prefect API (or ephemeral if None)."""

    tart_home: Path
    prefect_home: Path
    api_url: str | None

    def env(self, **extra: str) -> dict[str, str]:
        env = prefect_env(self.prefect_home, self.api_url)
        env.update(TART_HOME=str(self.tart_home), TARTFLOW_READ_TIMEOUT="5")
        env.update(extra)
        env.pop("TARTFLOW_HOME", None)
        return env

    def run(self, *args: str, timeout: float = 180, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command(), *args], env=self.env(**extra), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, *args: str, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*command(), *args], env=self.env(**extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    @property
    def oci(self) -> Path:
        return self.tart_home / "cache" / "OCIs"

    @property
    def store(self) -> Path:
        return self.tart_home / "tartflow"
