"""Runners feeding each other (issue 16): ``tartflow serve`` over this machine's Tart cache, and
pulls that ask peers for layers before mirrors and the registry.

server.py (the endpoint) and index.py (what it may serve), client.py (the receiver), wire.py (the
zero-run representation), token.py (the shared bearer token). The registry or a mirror stays the
root of trust: peers only ever supply bytes that are verified against its manifest.
"""

from .client import PeerFetch, fetch_from_peers, parse_peers
from .token import current_token, use_token

__all__ = ["PeerFetch", "current_token", "fetch_from_peers", "parse_peers", "use_token"]
