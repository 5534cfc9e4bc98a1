"""tartflow's one exception hierarchy.

Errors from libraries below (httpx, OS, lz4) are translated once, at the boundary, into these.
Every error carries a one-line message meant for a user: what failed and what to do. The
``temporary`` flag says whether trying again later may succeed; retry policies (the core's
own and Prefect's ``retry_condition_fn``) decide from it and nothing else.
"""

from __future__ import annotations

__all__ = [
    "CorruptLayerError",
    "DigestMismatchError",
    "ImageFormatError",
    "InsufficientSpaceError",
    "InterruptedPull",
    "InvalidReferenceError",
    "RegistryError",
    "StoreError",
    "TartflowError",
    "UsageError",
]


class TartflowError(Exception):
    """Base of every error tartflow raises on purpose."""

    temporary: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(TartflowError):
    """The user asked for something malformed (a flag, a reference): exit code 2."""


class InvalidReferenceError(UsageError):
    """A reference, repository name or digest outside the grammar."""


class RegistryError(TartflowError):
    """A registry (or the CDN it redirects to) answered with an error, or could not be reached.

    ``status`` is the HTTP status (None for transport errors), ``codes`` the distribution-spec
    error codes from the body (``MANIFEST_UNKNOWN``, ``TOOMANYREQUESTS`` ...), ``url`` is already
    redacted (no query string), ``retry_after`` the server's requested wait in seconds.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        codes: tuple[str, ...] = (),
        method: str = "GET",
        url: str = "",
        temporary: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.codes = codes
        self.method = method
        self.url = url
        self.temporary = temporary
        self.retry_after = retry_after


class ImageFormatError(TartflowError):
    """The registry sent something that is not a Tart VM image tartflow can pull."""


class DigestMismatchError(TartflowError):
    """Bytes received do not match their descriptor's size or digest.

    Temporary: the partial is discarded and the blob fetched again, a bounded number of times.
    """

    temporary = True


class CorruptLayerError(DigestMismatchError):
    """A disk layer is not valid Apple-framed LZ4 or decodes to the wrong size or content.

    Permanent: the layer's compressed digest was verified first, so the registry would send
    the same broken bytes again.
    """

    temporary = False


class StoreError(TartflowError):
    """tartflow's content store or Tart's cache could not be read or written."""


class InsufficientSpaceError(StoreError):
    """Not enough free disk space; what was fetched so far is kept for a later resume."""


class InterruptedPull(TartflowError):
    """The user (SIGINT/SIGTERM) stopped the pull; every received byte is kept."""
