"""Registry credentials for deployments, from a Prefect Secret block named by a parameter.

The block holds ``{"username": ..., "password": ...}`` (for the image's registry) or
``{"<host>": {"username": ..., "password": ...}, ...}`` (several registries or mirrors), or the
text ``username:password``. The flow loads it in the worker's process and hands it to the core
in memory (``tartflow.credentials.use``): the secret is never a parameter, a task input, a
result, an artifact or a log line.
"""

from __future__ import annotations

from typing import Any, cast

from prefect.blocks.system import Secret

from tartflow.credentials import use
from tartflow.errors import UsageError
from tartflow.peer import current_token, use_token
from tartflow.registry.auth import Credentials

__all__ = ["PEER_TOKEN_BLOCK", "use_peer_token_block", "use_secret_block"]

#: The Secret block holding the fleet's peer token, used when $TARTFLOW_PEER_TOKEN is not set.
PEER_TOKEN_BLOCK = "tartflow-peer-token"


def _pair(value: Any) -> Credentials | None:
    if isinstance(value, str) and ":" in value:
        user, _, password = value.partition(":")
        return Credentials(user, password)
    if isinstance(value, dict) and isinstance(value.get("username"), str) and isinstance(value.get("password"), str):
        return Credentials(value["username"], value["password"])
    return None


def use_secret_block(name: str, host: str) -> None:
    """Load Secret block ``name`` and use its credentials for ``host`` (or the hosts it names)."""
    try:
        value = cast(Secret[Any], Secret.load(name)).get()
    except ValueError:
        raise UsageError(f"Prefect Secret block {name!r} not found; create it (see README) or fix the name") from None
    single = _pair(value)
    if single is not None:
        use(host, single)
        return
    pairs = {key: _pair(item) for key, item in value.items()} if isinstance(value, dict) else {}
    if not pairs or None in pairs.values():
        raise UsageError(f'Secret block {name!r} must hold {{"username": ..., "password": ...}} or a map of '
                         "registry host to such objects")
    for key, credentials in pairs.items():
        use(key, credentials)  # type: ignore[arg-type]


def use_peer_token_block() -> None:
    """The peer token from Secret block ``tartflow-peer-token`` unless the environment has one;
    without either, pulls skip peers (tartflow.peer says so once)."""
    if current_token():
        return
    try:
        value = cast(Secret[Any], Secret.load(PEER_TOKEN_BLOCK)).get()
    except ValueError:
        return
    if isinstance(value, str):
        use_token(value)
