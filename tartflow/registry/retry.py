"""Retrying temporary failures, bounded by time rather than by a count.

Egress limits on a blob CDN last minutes, so a pull keeps trying for ``retry_for`` seconds
(default 30 minutes). Waits honour Retry-After; otherwise exponential backoff with full jitter
(https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/), capped. An attempt
that made progress resets the backoff: a stream cut after 5 GB is not a reason to wait long.
When the time is up, RetriesExhaustedError is raised, chained to the last failure.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .. import cancel
from ..errors import RegistryError, RetriesExhaustedError, TartflowError
from . import waits

__all__ = ["RetryPolicy", "retrying"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``retry_for``: seconds to keep retrying temporary errors; ``base``/``cap``: backoff bounds."""

    retry_for: float = 30 * 60
    base: float = 1.0
    cap: float = 60.0
    max_digest_mismatches: int = 3

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.cap * 5)
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


OnWait = Callable[[TartflowError, float], None]


def retrying(
    attempt_fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    on_wait: OnWait | None = None,
) -> T:
    """Call ``attempt_fn`` until it returns or raises a permanent error.

    On a temporary TartflowError it is called again after a wait; one that ``progressed``
    (bytes arrived before it) resets the backoff. A temporary error that would outlast
    ``policy.retry_for`` ends it with RetriesExhaustedError (the cause's message and what to
    do), chained to it. The wait is interruptible (SIGINT/SIGTERM raise InterruptedPull).
    """
    deadline = time.monotonic() + policy.retry_for
    attempt = 0
    while True:
        cancel.check()
        try:
            with waits.budget(deadline):  # a manifest or token exchange ends inside retry_for
                return attempt_fn()
        except TartflowError as exc:
            if not exc.temporary or exc.exhausted:
                raise
            attempt = 0 if exc.progressed else attempt + 1
            wait = policy.delay(attempt, exc.retry_after if isinstance(exc, RegistryError) else None)
            if time.monotonic() + wait > deadline:
                raise RetriesExhaustedError(
                    f"{exc.message} (gave up after retrying for {policy.retry_for / 60:g} min; "
                    "run the same command again to continue)"
                ) from exc
            if on_wait:
                on_wait(exc, wait)
            cancel.sleep(wait)
