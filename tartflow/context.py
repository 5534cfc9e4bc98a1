"""What a pull is told (``PullSettings``: values only, a Prefect parameter) and what it works
with (``PullContext``: the store, Tart's cache, the registry clients and the retry policy,
built from the settings once per task run).

The core steps in ``tartflow.pull`` take a ``PullContext``, so a test can hand a step a
client or a store of its own; ``Landing`` says where a pull lands without touching the disk,
which is what a task's cache key is made of.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from . import credentials
from .peer.client import parse_peers
from .reference import Reference
from .registry.client import ClientSettings
from .registry.mirrors import BlobSource, parse_mirrors, source_for
from .registry.retry import RetryPolicy
from .store import Store
from .tartcache import TartCache, tart_home

__all__ = ["SPACE_MARGIN", "Landing", "PullContext", "PullSettings", "store_root"]

#: Headroom kept free beyond what the pull needs, so the machine stays usable.
SPACE_MARGIN = 1024**3


def store_root(home: Path | None = None) -> Path:
    """``$TARTFLOW_HOME``, else ``$TART_HOME/tartflow`` (same file system as Tart's cache)."""
    env = os.environ.get("TARTFLOW_HOME")
    return Path(os.path.abspath(env)) if env else (home or tart_home()) / "tartflow"


@dataclass(frozen=True)
class PullSettings:
    """How to pull: plain values, so it travels as a Prefect task parameter as itself.

    ``retry_for``: seconds to keep retrying temporary failures (egress limits last minutes).
    ``tart_home``/``store``: default from ``$TART_HOME`` and ``$TARTFLOW_HOME`` where the step
    runs (see ``landing``).
    ``read_timeout``: seconds a stream may stay silent before it counts as stalled.
    """

    insecure: bool = False
    retry_for: float = 30 * 60
    read_timeout: float = 60.0
    tart_home: str | None = None
    store: str | None = None
    check_space: bool = True
    space_margin: float = SPACE_MARGIN
    concurrency: int = 4  # layer downloads in flight: bounds the compressed bytes on disk at once
    mirrors: dict[str, list[str]] | None = None
    peers: list[str] | None = None  # peer endpoints asked for layers first (tartflow.peer)

    @classmethod
    def from_env(cls, **values: object) -> PullSettings:
        """Settings with ``read_timeout`` from ``$TARTFLOW_READ_TIMEOUT`` (seconds) and
        ``space_margin`` from ``$TARTFLOW_SPACE_MARGIN`` (bytes) when set."""
        for env, name in (("TARTFLOW_READ_TIMEOUT", "read_timeout"), ("TARTFLOW_SPACE_MARGIN", "space_margin")):
            if os.environ.get(env):
                values.setdefault(name, float(os.environ[env]))
        # A mirrors value passed in is parsed too, so userinfo in a flow parameter is refused
        # before anything runs.
        given = cast("dict[str, list[str]] | None", values.get("mirrors"))
        values["mirrors"] = parse_mirrors(given or os.environ.get("TARTFLOW_MIRRORS")) or None
        peers = cast("list[str] | str | None", values.get("peers"))
        values["peers"] = parse_peers(peers or os.environ.get("TARTFLOW_PEERS")) or None
        return cls(**values)  # type: ignore[arg-type]

    def landing(self) -> Landing:
        """Where a pull with these settings lands on this machine; reads the environment only."""
        home = Path(self.tart_home) if self.tart_home else tart_home()
        return Landing(socket.gethostname(), str(home), str(Path(self.store) if self.store else store_root(home)))


@dataclass(frozen=True)
class Landing:
    """The machine, Tart home and store a pull writes to: a task's output exists only there,
    so a cached result is keyed on it (result storage may be shared by a whole fleet)."""

    host: str
    tart_home: str
    store: str


def registry_source(settings: PullSettings, ref: Reference) -> BlobSource:
    """The registry of ``ref``, behind its mirrors when any are configured."""
    client_settings = ClientSettings(insecure=settings.insecure, read_timeout=settings.read_timeout)
    urls = parse_mirrors(settings.mirrors).get(ref.host)
    return source_for(ref.host, urls, client_settings, credentials.lookup, credentials.lookup_mirror)


@dataclass(frozen=True)
class PullContext:
    """What the core steps work with: built from settings once per step (``build``), or by a
    test from parts of its own. ``client(ref)`` gives the blob source for a reference."""

    settings: PullSettings
    store: Store
    cache: TartCache
    policy: RetryPolicy
    client: Callable[[Reference], BlobSource] = field(repr=False)

    @classmethod
    def build(cls, settings: PullSettings) -> PullContext:
        """The context for ``settings``; creates the store's directories if they are missing."""
        landing = settings.landing()
        return cls(
            settings,
            Store(Path(landing.store)),
            TartCache(Path(landing.tart_home)),
            RetryPolicy(retry_for=settings.retry_for),
            lambda ref: registry_source(settings, ref),
        )
