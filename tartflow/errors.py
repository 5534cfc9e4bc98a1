"""tartflow's one exception hierarchy.

Errors from libraries below (httpx, OS, lz4) are translated once, at the boundary, into these.
Every error carries a one-line message meant for a user: what failed and what to do. Its
retry semantics are constructor fields, fixed when it is raised and never changed after:

- ``temporary``: trying again later may succeed (each class has a default);
- ``progressed``: bytes arrived before it, so a retry should not wait long;
- ``exhausted``: it was already retried for as long as the policy allows.

Retry policies (the core's own and Prefect's ``retry_condition_fn``) decide from these fields
and nothing else. Code that learns more about a failure raises a new error, chained ``from``
the one it caught, instead of editing it.
"""

from __future__ import annotations

__all__ = [
    "CacheLayoutError",
    "CorruptLayerError",
    "DigestMismatchError",
    "ImageFormatError",
    "InsufficientSpaceError",
    "InterruptedPull",
    "InvalidReferenceError",
    "RegistryError",
    "RetriesExhaustedError",
    "StoreError",
    "TartflowError",
    "UsageError",
]


class TartflowError(Exception):
    """Base of every error tartflow raises on purpose; keyword arguments left out (None) keep
    the class's default."""

    temporary: bool = False
    progressed: bool = False
    exhausted: bool = False

    def __init__(
        self, message: str, *, temporary: bool | None = None, progressed: bool | None = None,
        exhausted: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if temporary is not None:
            self.temporary = temporary
        if progressed is not None:
            self.progressed = progressed
        if exhausted is not None:
            self.exhausted = exhausted

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
        progressed: bool = False,
        exhausted: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, temporary=temporary, progressed=progressed, exhausted=exhausted)
        self.status = status
        self.codes = codes
        self.method = method
        self.url = url
        self.retry_after = retry_after

    def with_progress(self, progressed: bool) -> RegistryError:
        """The same failure, saying whether bytes arrived before it (raise it ``from`` this one)."""
        return RegistryError(self.message, status=self.status, codes=self.codes, method=self.method, url=self.url,
                             temporary=self.temporary, progressed=progressed, exhausted=self.exhausted,
                             retry_after=self.retry_after)


class ImageFormatError(TartflowError):
    """The registry sent something that is not a Tart VM image tartflow can pull."""


class DigestMismatchError(TartflowError):
    """Bytes received do not match their descriptor's size or digest (or, for a disk layer
    decoded on the way in, do not decode: the compressed digest is not verified yet then).

    Temporary by default: the partial is discarded and the blob fetched again, at most
    ``RetryPolicy.max_digest_mismatches`` times; the last is raised with ``temporary=False``.
    """

    temporary = True


class CorruptLayerError(DigestMismatchError):
    """A disk layer is not valid Apple-framed LZ4 or decodes to the wrong size or content.

    Permanent: it is raised only once the layer's compressed digest was verified (on a blob in
    the store, or after the last byte of a download decoded on the way in), so the registry
    would send the same broken bytes again and nothing retries it. Bytes that fail to decode
    before their digest is known are a DigestMismatchError instead (fetch.py).
    """

    temporary = False


class StoreError(TartflowError):
    """tartflow's content store or Tart's cache could not be read or written."""


class CacheLayoutError(StoreError):
    """Tart's cache holds a symbolic link, or something that is not a directory, where tartflow
    would have to write or delete through it (tartcache.py): nothing is touched, the message
    names the path and what to move away. Permanent: it stays until a person fixes it."""


class InsufficientSpaceError(StoreError):
    """Not enough free disk space; what was fetched so far is kept for a later resume."""


class RetriesExhaustedError(TartflowError):
    """A temporary failure that went on for the whole ``retry_for``; chained to the last one.

    Still temporary (a later run may succeed) but exhausted: Prefect does not retry it again.
    """

    temporary = True
    exhausted = True


class InterruptedPull(TartflowError):
    """The user (SIGINT/SIGTERM) stopped the pull; every received byte is kept."""
