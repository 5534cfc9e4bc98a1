"""What a person sees in a terminal: run ``tartflow pull`` in a pseudo-terminal (as a user's
shell would) on the default ephemeral Prefect server, and read the screen's bytes."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

from tests.checks import assert_pulled
from tests.support.cli import Tartflow, command
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage


def _run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 180) -> tuple[int, str]:
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    screen = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not data:
                break
            screen += data
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=30), screen.decode("utf-8", "replace")


def test_a_terminal_shows_tartflows_bar_and_nothing_of_prefect(
    tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    user = Tartflow(tmp_path / "tart", tmp_path / "prefect", api_url=None)  # a newcomer's machine
    proxy.throttle(4_000_000)  # slow enough for the bar to draw a few frames
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    code, screen = _run_in_pty([*command(), "pull", "--insecure", ref], {**user.env(), "TERM": "xterm-256color"})
    assert code == 0, screen[-3000:]
    assert_pulled(user, proxy.host, small_image)
    assert "layers verified" in screen and "MB" in screen
    assert f"{len(small_image.disk_layers)}/{len(small_image.disk_layers)} layers verified" in screen
    for noise in ("Prefect collects", "telemetry", "Traceback", "Warning", "WARNING", "temporary server"):
        assert noise not in screen, f"{noise!r} reached the terminal:\n{screen[-3000:]}"
    assert screen.count(" into ") == 1  # the final line, once
