"""The fleet's shared peer token: ``$TARTFLOW_PEER_TOKEN``, or one handed over in memory (the
flow layer loads it from a Prefect Secret block). It is never logged, never a parameter."""

from __future__ import annotations

import hmac
import os

__all__ = ["ENV", "current_token", "token_matches", "use_token"]

ENV = "TARTFLOW_PEER_TOKEN"
_in_memory: str | None = None


def use_token(token: str) -> None:
    global _in_memory
    _in_memory = token or None


def current_token() -> str | None:
    return _in_memory or os.environ.get(ENV) or None


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>``, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
