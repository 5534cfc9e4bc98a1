"""Registry credentials the way Tart users already have them (Credentials/*.swift), in Tart's order.

1. ``TART_REGISTRY_USERNAME`` / ``TART_REGISTRY_PASSWORD``, for every host, or only for
   ``TART_REGISTRY_HOSTNAME`` when that is set.
"""

from __future__ import annotations

import os

from .registry.auth import Credentials

__all__ = ["lookup"]


def _from_env(host: str) -> Credentials | None:
    user, password = os.environ.get("TART_REGISTRY_USERNAME"), os.environ.get("TART_REGISTRY_PASSWORD")
    only = os.environ.get("TART_REGISTRY_HOSTNAME")
    if user and password and (not only or only == host):
        return Credentials(user, password)
    return None


def lookup(host: str) -> Credentials | None:
    """Credentials for ``host`` from the first source that has them, else None (anonymous)."""
    return _from_env(host)
