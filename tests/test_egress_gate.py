"""The egress gate (tasks/egress.py): two requests per layer, and never the cost of a download.

The server errors behind the first three cases (423 on taking a slot, 500 on releasing one)
came from a real Prefect server under 16 runners (docs/scale.md) and cannot be produced on
demand, so the slot there is a stand-in context manager.
Mutants caught: the release not guarded (test 1 fails), the acquire error not made temporary
(test 2 fails), a failed release replacing the body's own error (test 3 fails).

The rest run :func:`tasks.egress.slot` against a real Prefect server and count its requests in
the server's access log: the slot's lease renewed at once or never (renewal tests fail), the
slot not released (slots in use stay 1), a 423 taken as a grant (the limit is exceeded).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prefect.context import SyncClientContext
from prefect.settings import PREFECT_API_URL, temporary_settings

from tartflow.errors import TartflowError
from tartflow.progress import Reporter, set_reporter
from tasks.egress import guarded, slot
from tasks.pull import is_temporary
from tests.support.fleetsim import ScaleServer


class ServerError(Exception):
    pass


@contextmanager
def stand_in(fail_on: str = "") -> Iterator[None]:
    if fail_on == "take":
        raise ServerError("423 Locked")
    try:
        yield
    finally:
        if fail_on == "release":
            raise ServerError("500 Internal Server Error")


def test_a_failed_release_is_logged_and_the_layer_stands(caplog: pytest.LogCaptureFixture) -> None:
    done = []
    with caplog.at_level(logging.WARNING, logger="tartflow.egress"), guarded("tartflow-egress", lambda: stand_in("release")):
        done.append("layer")
    assert done == ["layer"]
    assert "releasing the slot failed" in caplog.text and "lease expires" in caplog.text


def test_a_slot_not_granted_is_temporary_and_retried() -> None:
    with pytest.raises(TartflowError) as caught, guarded("tartflow-egress", lambda: stand_in("take")):
        pytest.fail("the body must not run without a slot")
    assert caught.value.temporary and not caught.value.exhausted
    assert isinstance(caught.value.__cause__, ServerError)

    class State:
        def result(self, raise_on_failure: bool = True) -> BaseException:
            return caught.value

    assert is_temporary(None, None, State())


def test_the_bodys_own_error_wins_over_a_failed_release() -> None:
    with pytest.raises(KeyError), guarded("tartflow-egress", lambda: stand_in("release")):
        raise KeyError("the layer's own failure")


# --- the gate against a real Prefect server: what it asks, and that the slot comes back -------

GATE_ROUTES = ("/api/v2/concurrency_limits/increment-with-lease", "/api/v2/concurrency_limits/decrement-with-lease",
               "/api/v2/concurrency_limits/leases/{id}/renew", "/api/csrf-token")


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleServer]:
    """A Prefect server (SQLite) whose access log counts every request the gate makes."""
    server = ScaleServer(tmp_path_factory.mktemp("gate-server"), "sqlite")
    yield server
    server.stop()


@contextmanager
def client_of(server: ScaleServer) -> Iterator[None]:
    """What a task run has: settings naming the server and one sync client in context."""
    with temporary_settings({PREFECT_API_URL: server.api_url}), SyncClientContext.get_or_create():
        yield


def gate_requests(server: ScaleServer, since: Counter[tuple[str, str, int]]) -> Counter[tuple[str, int]]:
    return Counter({(path, status): n for (_, path, status), n in (server.requests() - since).items()
                    if path in GATE_ROUTES})


def slots_in_use(server: ScaleServer, name: str) -> int:
    return int(server.api("GET", f"/v2/concurrency_limits/{name}")["active_slots"])


def limit(server: ScaleServer, name: str, slots: int) -> str:
    server.api("POST", "/v2/concurrency_limits/", {"name": name, "limit": slots})
    return name


def settled(server: ScaleServer, since: Counter[tuple[str, str, int]], want: int) -> Counter[tuple[str, int]]:
    """The gate's requests once ``want`` of them have reached the access log (it is written async)."""
    deadline = time.monotonic() + 10
    while True:
        seen = gate_requests(server, since)
        if sum(seen.values()) >= want or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


@pytest.mark.timeout(120)  # a slot never given back would hold the next for its 300 s lease
def test_a_layer_costs_two_requests_and_its_slot_comes_back(logged: ScaleServer) -> None:
    name = limit(logged, "gate-two-requests", 2)
    with client_of(logged):
        with slot(name):
            pass  # the client's first change request fetches its CSRF token once; not counted below
        before = logged.requests()
        held = []
        for _ in range(3):
            with slot(name):
                held.append(slots_in_use(logged, name))
            assert slots_in_use(logged, name) == 0  # given back at once, not when its lease runs out
    assert held == [1, 1, 1]
    increment, decrement = GATE_ROUTES[0], GATE_ROUTES[1]
    assert settled(logged, before, 6) == Counter({(increment, 200): 3, (decrement, 204): 3})  # no renewal, no CSRF


@pytest.mark.timeout(120)
def test_a_long_layer_renews_its_lease_and_a_short_one_does_not(logged: ScaleServer) -> None:
    name = limit(logged, "gate-renewal", 1)
    with client_of(logged):
        before = logged.requests()
        with slot(name, lease=60, renew_after=0.4):
            time.sleep(1.5)
            assert slots_in_use(logged, name) == 1
    renewals = settled(logged, before, 5)[(GATE_ROUTES[2], 204)]
    assert 2 <= renewals <= 4
    assert slots_in_use(logged, name) == 0


@pytest.mark.timeout(120)
def test_a_missing_limit_lets_layers_through_and_is_asked_once(logged: ScaleServer) -> None:
    ran = []
    with client_of(logged):
        before = logged.requests()
        for n in range(3):
            with slot("gate-no-such-limit"):
                ran.append(n)
    assert ran == [0, 1, 2]
    assert settled(logged, before, 1)[(GATE_ROUTES[0], 200)] == 1


class Waits(Reporter):
    """Records what a pull would tell its user about waiting."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def waiting(self, reason: str, seconds: float) -> None:
        self.reasons.append(reason)


@pytest.mark.timeout(120)  # a slot never given back would hold the next for its 300 s lease
def test_a_full_limit_is_waited_for_not_exceeded(logged: ScaleServer) -> None:
    name = limit(logged, "gate-full", 1)
    events: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with client_of(logged), slot(name):
            events.append("first in")
            first_in.set()
            time.sleep(1.0)
            events.append("first out")

    other = threading.Thread(target=first)
    other.start()
    assert first_in.wait(30)
    said = Waits()
    previous = set_reporter(said)
    try:
        with client_of(logged):
            before = logged.requests()
            with slot(name):
                events.append("second in")
                assert slots_in_use(logged, name) == 1
    finally:
        set_reporter(previous)
    other.join(30)
    assert events == ["first in", "first out", "second in"]
    assert said.reasons == [f"every slot of the fleet's egress limit {name!r} is in use"]  # once, not per 423
    assert settled(logged, before, 3)[(GATE_ROUTES[0], 423)] >= 1  # refused, then waited out
    assert slots_in_use(logged, name) == 0
