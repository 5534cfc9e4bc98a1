"""Image references in Tart's grammar, and digests, validated before any path is built from them.

Grammar (Tart's, on top of the distribution spec's):
``host[:port]/namespace[:tag | @sha256:<hex>]`` — the host is required, the tag is ``latest``
when absent. Namespace components follow the distribution spec
(https://github.com/distribution/distribution/blob/main/docs/spec/api.md, "repository name"):
lowercase alphanumerics separated by ``.``, ``_``, ``__`` or ``-``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidReferenceError

__all__ = ["Reference", "digest_hex", "parse_reference", "validate_digest"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"(?::[0-9]{1,5})?"
    r"|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?"
)
_MAX_NAME = 255


def validate_digest(value: object, *, what: str = "digest") -> str:
    """Return ``value`` if it is ``sha256:`` followed by 64 lowercase hex characters, else raise.

    Every digest that reaches a path (store, Tart cache) passes through here first.
    """
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        shown = repr(value)[:80]
        raise InvalidReferenceError(
            f"invalid {what} {shown}: expected sha256: followed by 64 lowercase hex characters"
        )
    return value


def digest_hex(digest: str) -> str:
    """The hex part of a validated digest."""
    return validate_digest(digest)[len("sha256:") :]


@dataclass(frozen=True)
class Reference:
    """A parsed reference. Exactly one of ``tag`` and ``digest`` is set."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/`` in the registry API and names the cache entry."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"


def parse_reference(text: str) -> Reference:
    """Parse ``text`` in Tart's grammar; raise InvalidReferenceError with the expected form."""
    hint = "expected host[:port]/namespace[:tag|@sha256:<hex>], e.g. ghcr.io/cirruslabs/macos-sequoia-base:latest"
    if not isinstance(text, str) or not text or len(text) > 1024 or text.strip() != text:
        raise InvalidReferenceError(f"invalid image reference {text!r}: {hint}")
    rest, digest, tag = text, None, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        validate_digest(digest, what=f"digest in reference {text!r}")
    host, sep, path = rest.partition("/")
    if not sep or not _HOST.fullmatch(host) or not ("." in host or ":" in host or host == "localhost"):
        raise InvalidReferenceError(f"invalid image reference {text!r}: registry host missing; {hint}")
    if digest is None:
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, tag = path.rsplit(":", 1)
            if not _TAG.fullmatch(tag):
                raise InvalidReferenceError(f"invalid tag {tag!r} in {text!r}: {hint}")
        else:
            tag = "latest"
    components = path.split("/")
    if not path or len(path) > _MAX_NAME or not all(_COMPONENT.fullmatch(c) for c in components):
        raise InvalidReferenceError(
            f"invalid repository {path!r} in {text!r}: lowercase letters, digits and . _ - separators; {hint}"
        )
    return Reference(host=host, repository=path, tag=tag, digest=digest)
