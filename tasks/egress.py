"""The fleet's egress gate: a slot of a Prefect global concurrency limit held while a layer
moves bytes over the network.

The gate is a courtesy to the registry's account, never a reason to lose a download. Measured
with 16 runners on one server (docs/scale.md), taking a slot was refused with 423 and releasing
one failed with 500 now and then; before this wrapper either error escaped ``fetch-layer`` and
failed a pull whose bytes were already on disk. So:

- a slot that cannot be taken is a temporary error: the task's retries try again later;
- a slot that cannot be released is logged and left to its lease, which expires on its own
  (Prefect's leases exist for holders that vanish); the layer's own outcome stands.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from tartflow.errors import TartflowError

__all__ = ["guarded"]

_log = logging.getLogger("tartflow.egress")


@contextmanager
def guarded(name: str, take: Callable[[], AbstractContextManager[object]]) -> Iterator[None]:
    """Hold the slot ``take()`` gives for the body, with the failure rules above."""
    slot = take()
    try:
        slot.__enter__()
    except Exception as exc:
        raise TartflowError(
            f"egress limit {name!r}: the Prefect server did not grant a slot ({type(exc).__name__}); "
            "trying again later", temporary=True,
        ) from exc
    try:
        yield
    except BaseException as exc:
        _release(name, slot, exc)
        raise
    _release(name, slot, None)


def _release(name: str, slot: AbstractContextManager[object], exc: BaseException | None) -> None:
    try:
        slot.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
    except Exception as failure:
        if failure is exc:  # the body's own error coming back through the slot: not ours to log
            return
        _log.warning("egress limit %r: releasing the slot failed (%s); its lease expires on its own",
                     name, type(failure).__name__)
