"""Translate HTTP answers and transport failures into RegistryError, once, at the boundary.

Spec error codes: https://github.com/opencontainers/distribution-spec/blob/main/spec.md#error-codes
"""

from __future__ import annotations

import email.utils
import json
import time
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..errors import RegistryError

__all__ = ["error_from_response", "error_from_transport", "parse_retry_after", "redact"]

#: Statuses worth trying again: the request may succeed later without anything changing here.
TEMPORARY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def redact(url: str | httpx.URL) -> str:
    """A URL fit to show: no query string (signed CDN URLs carry credentials there), no userinfo."""
    parts = urlsplit(str(url))
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header in either form (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _codes_and_detail(response: httpx.Response, body: bytes) -> tuple[tuple[str, ...], str]:
    codes: list[str] = []
    detail = ""
    azure = response.headers.get("x-ms-error-code")
    if azure:
        codes.append(azure)
    try:
        doc = json.loads(body)
        for err in doc.get("errors", [])[:5]:
            codes.append(str(err.get("code", ""))[:64])
            detail = detail or str(err.get("message", ""))[:200]
    except (ValueError, AttributeError, TypeError):
        text = body[:2000].decode("utf-8", "replace")
        if "<Message>" in text:
            detail = text.split("<Message>", 1)[1].split("</Message>", 1)[0][:200]
    return tuple(c for c in codes if c), detail


def error_from_response(
    response: httpx.Response, body: bytes, *, what: str, from_cdn: bool = False, hint: str = ""
) -> RegistryError:
    """A RegistryError for a non-success answer; ``what`` names the object, e.g. 'manifest acme/vm:v1'."""
    status = response.status_code
    codes, detail = _codes_and_detail(response, body)
    temporary = status in TEMPORARY_STATUSES
    # A CDN's 403 means its signed URL expired; a fresh redirect from the registry fixes it.
    if from_cdn and status == 403:
        temporary = True
    shown = f"{status} {' '.join(codes) or response.reason_phrase}".strip()
    if detail:
        shown += f": {detail}"
    if status == 404:
        message = f"{what} not found (404 {' '.join(codes)}) at {redact(response.request.url)}"
    elif status == 401:
        message = f"{what}: registry {response.request.url.host} refused the credentials (401){hint}"
    elif status == 403 and not from_cdn:
        message = f"{what}: access denied (403) by {response.request.url.host}{hint}"
    else:
        message = f"{what}: {redact(response.request.url)} answered {shown}"
    return RegistryError(
        message,
        status=status,
        codes=codes,
        method=response.request.method,
        url=redact(response.request.url),
        temporary=temporary,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


def error_from_transport(exc: httpx.TransportError, *, what: str) -> RegistryError:
    """Network failures (refused, reset, timeout, cut stream) are worth a retry; a TLS
    certificate that does not verify is not: retrying will not make it trusted."""
    try:
        url = redact(exc.request.url)
    except RuntimeError:
        url = ""
    kind = type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
        return RegistryError(
            f"{what}: the TLS certificate of {url or 'the registry'} is not trusted; add its CA to the "
            "system trust store or point SSL_CERT_FILE at a CA bundle (or use --insecure for a plain-HTTP registry)",
            url=url,
        )
    return RegistryError(
        f"{what}: network error talking to {url or 'the registry'} ({kind}: {str(exc)[:160] or 'no detail'})",
        url=url,
        temporary=True,
    )
