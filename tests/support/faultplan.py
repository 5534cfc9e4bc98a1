"""What the fault proxy injects, as plain records: the URL shapes it recognises, the canned
bodies it answers with, and how one blob body response is to be (mis)served.

Shared by :mod:`tests.support.faultproxy` (the controller tests call) and
:mod:`tests.support.faultserver` (the HTTP handler that applies the faults).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "AUTH_FAILED_BODY",
    "BLOB_PATH",
    "CDN_PATH",
    "CHUNK",
    "HOP_BY_HOP",
    "SERVER_BUSY_BODY",
    "Aborted",
    "BodyFault",
    "Canned",
    "Plan",
    "RequestRecord",
]

BLOB_PATH = r"^/v2/(?P<name>.+)/blobs/(?P<digest>[A-Za-z0-9_+.-]+:[A-Za-z0-9=_-]+)$"
CDN_PATH = r"^/cdn/(?P<digest>[A-Za-z0-9_+.-]+:[A-Za-z0-9=_-]+)$"
SERVER_BUSY_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
    b"<Message>Egress is over the account limit.</Message></Error>"
)
AUTH_FAILED_BODY = (
    b"<Error><Code>AuthenticationFailed</Code>"
    b"<Message>Server failed to authenticate the request.</Message></Error>"
)
CHUNK = 64 * 1024
# Not forwarded either way: hop-by-hop headers, and the framing headers the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "host",
        "content-length",
    }
)


class RequestRecord(NamedTuple):
    """One request as the proxy answered it; compares equal to a plain 5-tuple."""

    method: str
    path: str  # as the client sent it, query included
    status: int  # 0 until the status line is sent
    range_header: str | None  # the request's Range header
    bytes_sent: int  # response body bytes written to the client so far


@dataclass
class Canned:
    method: str
    pattern: re.Pattern[str]
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    remaining: int | None  # None: forever
    retry_after_in: float | None = None  # send Retry-After as the HTTP date this long after answering

    def matches(self, method: str, path: str) -> bool:
        wanted = self.method in ("*", method)
        return (
            wanted
            and (self.remaining is None or self.remaining > 0)
            and bool(self.pattern.search(path))
        )


@dataclass
class BodyFault:
    kind: str  # "cut" | "stall" | "short"
    nbytes: int | None = None
    seconds: float = 0.0
    reset: bool = False
    missing: int | None = None
    digest: str | None = None  # only a response for this blob takes it; None: the next one


@dataclass
class Plan:
    """How one blob body response is to be (mis)served; fixed when its headers go out."""

    epoch: int
    limit: int | None = None  # body bytes to send before the fault ends the response
    fault: BodyFault | None = None
    flip_at: int | None = None  # body-relative offset of the byte to invert
    rate: float | None = None


class Aborted(Exception):
    """The response was cut on purpose; the connection is already shut down."""

