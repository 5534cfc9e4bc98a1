"""Where runners' peer endpoints are registered, and the order ``prewarm-fleet`` feeds runners in.

A runner started with ``python -m deployments.fleet runner NAME --serve HOST:PORT`` records its
endpoint in the Prefect Variable ``tartflow-peer-<name>`` (one Variable per runner, so runners
starting together never overwrite each other's entry): ``{"runner": NAME, "url": URL}``.

Feeding (``Spread``): for each image, ``seeds`` runners pull from upstream first. Every runner
that completes and serves becomes a peer of the pulls started after it, and pulls in flight are
allowed up to the number of peers there are (at least ``seeds``). So each peer feeds about one
runner at a time and the number of runners holding the image doubles per round, with no barrier
between rounds: a runner starts the moment one finishes. Upstream carries the image about
``seeds`` times, not once per runner. With no runner registered, every pull starts at once as
before, and a runner without an endpoint only ever receives.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from prefect.client.orchestration import get_client
from prefect.variables import Variable

__all__ = ["PEER_PREFIX", "Spread", "register_peer", "registered_peers", "unregister_peer"]

PEER_PREFIX = "tartflow-peer-"


def _variable(runner: str) -> str:
    return PEER_PREFIX + re.sub(r"[^a-z0-9_-]", "-", runner.lower())


def register_peer(runner: str, url: str) -> None:
    Variable.set(_variable(runner), {"runner": runner, "url": url}, overwrite=True)


def unregister_peer(runner: str) -> None:
    Variable.unset(_variable(runner))


def registered_peers() -> dict[str, str]:
    """Runner work queue -> its peer endpoint URL, for every runner registered."""
    with get_client(sync_client=True) as client:
        variables = client.read_variables()
    peers: dict[str, str] = {}
    for variable in variables:
        value = variable.value
        if variable.name.startswith(PEER_PREFIX) and isinstance(value, dict):
            runner, url = value.get("runner"), value.get("url")
            if isinstance(runner, str) and isinstance(url, str):
                peers[runner] = url
    return peers


@dataclass
class Spread:
    """One image's way through the fleet: who still waits, who holds it and serves it."""

    image: str
    waiting: list[str]
    seeds: int
    serving: dict[str, str]  # runner -> peer URL, for runners that serve
    holders: list[str] = field(default_factory=list)  # peer URLs of runners that completed
    in_flight: int = 0
    started: int = 0

    def next_starts(self) -> list[tuple[str, list[str]]]:
        """Runners to start now, each with the peers it should ask (rotated to spread load)."""
        starts = []
        while self.waiting and self.in_flight < max(self.seeds, len(self.holders)):
            runner = self.waiting.pop(0)
            shift = self.started % len(self.holders) if self.holders else 0
            starts.append((runner, self.holders[shift:] + self.holders[:shift]))
            self.in_flight += 1
            self.started += 1
        return starts

    def finished(self, runner: str, completed: bool) -> None:
        self.in_flight -= 1
        if completed and runner in self.serving:
            self.holders.append(self.serving[runner])


def spread_order(runners: list[str], serving: dict[str, str]) -> list[str]:
    """Serving runners first: they are the ones that can feed the rest."""
    key: Callable[[str], bool] = lambda runner: runner not in serving  # noqa: E731
    return sorted(runners, key=key)
