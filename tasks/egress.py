"""The fleet's egress gate: a slot of a Prefect global concurrency limit held while a layer
moves bytes over the network.

Two requests per layer. Prefect's ``concurrency()`` costs four HTTP requests per block on
the server (docs/scale.md, 97 % of a pull's requests): the slot, a lease renewal made the
moment the slot is granted, the release, and a CSRF-token read by the fresh client each block
opens. :func:`slot` asks the same endpoints with the task run's own client, so it makes:

- ``increment-with-lease`` with a lease of :data:`LEASE` seconds (Prefect's default, so a
  runner that dies holds its slot no longer than with ``concurrency()``); a 423 is waited out
  for the ``Retry-After`` the server names, one asker per process at a time, and a stop
  (Ctrl+C) ends the wait; the pull says it is waiting for the fleet's limit (at most once a
  minute), so a stalled-looking pull explains itself;
- ``decrement-with-lease`` when the layer is done;
- ``leases/{id}/renew`` only for a layer that takes longer than three quarters of the lease,
  then again every three quarters of it, from a thread that sleeps until then.

A limit that does not exist is not an error (a laptop has none): the layer runs ungated, and
the answer is remembered for :data:`_ABSENT_FOR` seconds so an ungated pull does not ask for
every layer. The slot is held by the task run (the lease's holder, shown by Prefect).

Unlike ``concurrency()``, the gate emits no ``prefect.concurrency-limit.acquired/released``
events: two events per layer with their resource rows, which nothing of ours reads; the
limit's slots in use are on the server's Concurrency page and in ``prefect gcl inspect``.

The gate is a courtesy to the registry's account, never a reason to lose a download. Measured
with 16 runners on one server (docs/scale.md), taking a slot was refused with 423 and releasing
one failed with 500 now and then; before :func:`guarded` either error escaped ``fetch-layer``
and failed a pull whose bytes were already on disk. So:

- a slot that cannot be taken is a temporary error: the task's retries try again later;
- a slot that cannot be released is logged and left to its lease, which expires on its own
  (Prefect's leases exist for holders that vanish); the layer's own outcome stands.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.context import SyncClientContext, TaskRunContext
from prefect.settings import PREFECT_API_URL

from tartflow import cancel
from tartflow.errors import InterruptedPull, TartflowError
from tartflow.progress import reporter

__all__ = ["LEASE", "guarded", "slot"]

_log = logging.getLogger("tartflow.egress")

#: Seconds a slot's lease lasts without renewal (the server allows 60 s to a day).
LEASE = 300.0
#: Share of the lease after which a slot still held is renewed.
_RENEW_AT = 0.75
#: Seconds between attempts after a failed renewal.
_RENEW_RETRY = 5.0
#: Seconds a limit found missing is not asked for again.
_ABSENT_FOR = 30.0
#: Bounds on a 423's Retry-After, whatever the server says.
_WAIT_MIN, _WAIT_MAX = 0.2, 60.0

#: Seconds between checks for a stop while waiting for this process's turn to ask.
_TICK = 0.5
#: Least seconds between two announcements that a limit is full.
_ANNOUNCE_EVERY = 60.0

_absent: dict[tuple[str, str], float] = {}
_turns: dict[tuple[str, str], threading.Lock] = {}
_announced: dict[str, float] = {}
_lock = threading.Lock()


@contextmanager
def slot(name: str, *, lease: float = LEASE, renew_after: float | None = None) -> Iterator[None]:
    """Hold one slot of the global concurrency limit ``name`` for the body (see the module
    docstring); ``renew_after`` (default three quarters of ``lease``) is for tests."""
    key = (str(PREFECT_API_URL.value() or ""), name)
    if _known_absent(key):
        yield
        return
    with _client() as client:
        lease_id = _granted(client, key, lease)
        if lease_id is None:
            yield
            return
        stop = threading.Event()
        renewer = threading.Thread(target=_renew, args=(client, lease_id, lease, renew_after or lease * _RENEW_AT, stop),
                                   name=f"egress-lease-{lease_id}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(timeout=5)
            client.release_concurrency_slots_with_lease(lease_id=lease_id)


@contextmanager
def _client() -> Iterator[SyncPrefectClient]:
    """The task run's own client, used as it is: its engine opened it and closes it. Entering
    it again here (``with get_client()``) would count its users from several download threads
    at once, unlocked, and a lost count closes it under the others. Outside a run, a client of
    its own."""
    context = SyncClientContext.get()
    if context is not None and context.client is not None:
        yield context.client
        return
    with get_client(sync_client=True) as client:
        yield client


def _known_absent(key: tuple[str, str]) -> bool:
    with _lock:
        return _absent.get(key, 0.0) > time.monotonic()


def _granted(client: SyncPrefectClient, key: tuple[str, str], lease: float) -> UUID | None:
    """Take a slot of limit ``key[1]``: its lease id, or None when the limit does not exist.

    One acquirer per process and limit asks the server at a time; the others wait for their
    turn here (as behind Prefect's acquisition service). Without that every download thread of
    every runner polls on its own: measured with 32 runners, 8x the 423 answers, on a server
    already at its limit. A stop (Ctrl+C) ends the wait."""
    with _lock:
        turn = _turns.setdefault(key, threading.Lock())
    while not turn.acquire(timeout=_TICK):
        cancel.check()
    try:
        if _known_absent(key):  # found missing while this thread waited for its turn
            return None
        lease_id = _take(client, key[1], lease)
        if lease_id is None:
            with _lock:
                _absent[key] = time.monotonic() + _ABSENT_FOR
        return lease_id
    finally:
        turn.release()


def _take(client: SyncPrefectClient, name: str, lease: float) -> UUID | None:
    """A granted slot's lease id, or None when the limit does not exist."""
    context = TaskRunContext.get()
    holder = ConcurrencyLeaseHolder(type="task_run", id=context.task_run.id) if context else None
    while True:
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=lease, holder=holder)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise
            wait = _retry_after(exc.response)
            _announce(name, wait)
            cancel.sleep(wait)
            continue
        granted = response.json()
        if not granted.get("limits"):
            return None
        return UUID(str(granted["lease_id"]))


def _announce(name: str, wait: float) -> None:
    """Say why the pull is not moving (terminal, ``--json``, the run's log), at most once per
    :data:`_ANNOUNCE_EVERY` seconds per limit and process: a stall should explain itself, and a
    thousand waiting runners should not flood the server's logs."""
    now = time.monotonic()
    with _lock:
        if now - _announced.get(name, -_ANNOUNCE_EVERY) < _ANNOUNCE_EVERY:
            return
        _announced[name] = now
    reporter().waiting(f"every slot of the fleet's egress limit {name!r} is in use", wait)


def _retry_after(response: httpx.Response) -> float:
    try:
        seconds = float(response.headers.get("Retry-After", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, _WAIT_MIN), _WAIT_MAX) if seconds == seconds else 1.0  # NaN: 1 s


def _renew(client: SyncPrefectClient, lease_id: UUID, lease: float, every: float, stop: threading.Event) -> None:
    """Renew the lease every ``every`` seconds until ``stop``. A failed renewal is tried again
    every few seconds while the lease may still be alive; after that it is logged and renewal
    ends (the layer goes on; its slot may meanwhile be given to another runner)."""
    due, expires = every, time.monotonic() + lease
    while not stop.wait(due):
        try:
            client.renew_concurrency_lease(lease_id=lease_id, lease_duration=lease)
        except Exception as exc:
            if time.monotonic() + _RENEW_RETRY < expires:
                due = _RENEW_RETRY
                continue
            _log.warning("egress slot: renewing its lease failed (%s); the layer goes on, but its slot "
                         "may be given to another runner", type(exc).__name__)
            return
        due, expires = every, time.monotonic() + lease


@contextmanager
def guarded(name: str, take: Callable[[], AbstractContextManager[object]]) -> Iterator[None]:
    """Hold the slot ``take()`` gives for the body, with the failure rules above."""
    held = take()
    try:
        held.__enter__()
    except InterruptedPull:
        raise
    except Exception as exc:
        raise TartflowError(
            f"egress limit {name!r}: the Prefect server did not grant a slot ({type(exc).__name__}); "
            "trying again later", temporary=True,
        ) from exc
    try:
        yield
    except BaseException as exc:
        _release(name, held, exc)
        raise
    _release(name, held, None)


def _release(name: str, held: AbstractContextManager[object], exc: BaseException | None) -> None:
    try:
        held.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
    except Exception as failure:
        if failure is exc:  # the body's own error coming back through the slot: not ours to log
            return
        _log.warning("egress limit %r: releasing the slot failed (%s); its lease expires on its own",
                     name, type(failure).__name__)
