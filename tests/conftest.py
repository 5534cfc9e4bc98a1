"""Fixtures shared by the whole suite: a real registry on loopback and a small Tart image in it.

The machinery lives in ``tests/support``; this file only wires it to pytest's lifetimes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage, build_and_push, make_disk
from tests.support.postgres import Postgres, PostgresUnavailable, start_postgres
from tests.support.prefectserver import PrefectServer
from tests.support.registry import Registry, start_registry
from tests.support.taskruns import flow_run_ids, unexpected_failures

SMALL_DISK_SIZE = 12 * 1024 * 1024 + 12345  # three full 4 MiB layers and a short fourth
SMALL_LAYER_SIZE = 4 * 1024 * 1024
SMALL_BLOCK_SIZES = (65536, 100000, 1 << 20, 33333)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "task_failures(*patterns): task runs of this test may end Failed/Crashed with a state "
        "message matching one of these regexes (any other failed task run fails the test)")


def _servers(item: pytest.Item) -> list[PrefectServer]:
    """The real Prefect servers a test's pulls report to: the session's, or a fleet's own."""
    values = getattr(item, "funcargs", {}).values()
    return [v for v in values if isinstance(v, PrefectServer)] + [
        v.server for v in values if isinstance(getattr(v, "server", None), PrefectServer)]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A test that talks to a real Prefect server fails if a task run of a flow run it started
    ended Failed or Crashed, unless its ``task_failures`` marker expects that message: an error
    the command's exit code hides still fails the test (issue 20)."""
    servers = _servers(item)
    before = {server.api_url: flow_run_ids(server.api_url) for server in servers}
    result = yield
    marker = item.get_closest_marker("task_failures")
    expected = marker.args if marker else ()
    for server in servers:
        found = unexpected_failures(server.api_url, before[server.api_url], expected)
        if found:
            pytest.fail("task runs ended in an unexpected error:\n" + "\n".join(found), pytrace=False)
    return result


def _small_stored(index: int) -> bool:
    return index % 5 == 3


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One ``docker-registry`` for the session: no auth, filesystem storage, deletes enabled."""
    with start_registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture(scope="session")
def small_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """``acme/small:v1``: a ~12 MiB mixed disk in four disk layers, uneven blocks, some stored.

    Shared by the session: tests must not delete or overwrite it in the registry.
    """
    disk = tmp_path_factory.mktemp("small-image") / "disk.img"
    make_disk(disk, SMALL_DISK_SIZE, seed=1)
    return build_and_push(
        registry.url,
        "acme/small",
        "v1",
        disk,
        layer_size=SMALL_LAYER_SIZE,
        block_sizes=SMALL_BLOCK_SIZES,
        stored=_small_stored,
    )


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One real ``prefect server`` for the session; CLI runs talk to it as fleet runners do."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    yield server
    server.stop()


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL on 127.0.0.1 with its own data directory, removed afterwards; skips
    (saying why) where PostgreSQL is not installed or cannot start."""
    try:
        server = start_postgres()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    yield server
    server.stop()


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session registry, counting blob bytes served."""
    with FaultProxy(registry.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def user(tmp_path: Path, prefect_server: PrefectServer) -> Tartflow:
    """A fresh machine: empty TART_HOME, the session's Prefect server."""
    return Tartflow(tmp_path / "tart", tmp_path / "prefect", prefect_server.api_url)


@pytest.fixture(scope="session")
def medium_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """``acme/medium:v1``: a 24 MiB mixed disk in twelve 2 MiB layers, for byte budgets and kills."""
    disk = tmp_path_factory.mktemp("medium-image") / "disk.img"
    make_disk(disk, 24 * 1024 * 1024, seed=2)
    return build_and_push(registry.url, "acme/medium", "v1", disk, layer_size=2 * 1024 * 1024,
                          block_sizes=SMALL_BLOCK_SIZES, stored=_small_stored)
