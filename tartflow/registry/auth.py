"""Registry authentication as an httpx.Auth flow: send, read the 401 challenge, get a token, send again.

Token auth: https://distribution.github.io/distribution/spec/auth/token/ . Tokens are cached per
(realm, service, scope) until shortly before they expire, so a long blob download that outlives
its token re-authenticates once on the 401 and carries on. A 401 that survives a fresh token or
fresh Basic credentials is final: never retried in a loop.

An identity token (``Credentials(IDENTITY_TOKEN_USER, token)``, what ``docker login`` stores for
registries that issue one) is traded for access tokens with an OAuth2 refresh-token grant:
https://distribution.github.io/distribution/spec/auth/oauth/ .

Where credentials go: to the registry's own origin (scheme, host and port of its base URL) and
to the token realm its challenge names, nothing else. A request to any other origin (an upload
``Location`` pointing elsewhere) is sent without Authorization, and its challenge is not
answered. A realm is refused, as a permanent error, when it is not an http(s) URL, when it is
malformed, or when it would move an https exchange to plain http (unless ``insecure``). A token
answer must arrive whole, within ``deadline`` seconds and ``MAX_TOKEN_SIZE`` bytes.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import httpx

from ..errors import RegistryError
from . import waits
from .errors import error_from_response, error_from_transport, redact

__all__ = ["IDENTITY_TOKEN_USER", "CredentialLookup", "Credentials", "RegistryAuth"]

#: The username that marks a password as an identity (OAuth2 refresh) token, as Docker writes it.
IDENTITY_TOKEN_USER = "<token>"
#: The ``client_id`` sent with OAuth2 grants.
CLIENT_ID = "tartflow"
#: Largest token answer read; real ones are a few KiB (a JWT and its expiry).
MAX_TOKEN_SIZE = 64 * 1024

_PARAM = re.compile(r'(\w+)="([^"]*)"')
_REPO_PATH = re.compile(r"^/v2/(.+?)/(?:manifests|blobs)/")


@dataclass(frozen=True)
class Credentials:
    """A username and password (or identity token as password with username ``<token>``)."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<redacted>)"


CredentialLookup = Callable[[str], "Credentials | None"]


def _no_credentials(host: str) -> Credentials | None:
    return None


class RegistryAuth(httpx.Auth):
    """Bearer-token and Basic auth for one registry host, with tokens cached per scope."""

    def __init__(
        self,
        host: str,
        lookup: CredentialLookup = _no_credentials,
        *,
        tokens: httpx.Client,
        origin: str | None = None,
        insecure: bool = False,
        deadline: float = 120.0,
    ) -> None:
        """``tokens``: the client token requests go through (no auth, no redirects; its owner
        closes it); ``origin``: the registry's base URL (default ``https://host``)."""
        self._host = host
        self._lookup = lookup
        self._origin = _origin_of(httpx.URL(origin or f"https://{host}"))
        self._token_http = tokens
        self._insecure = insecure
        self._deadline = deadline
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, expiry)
        self._scheme: str | None = None  # "bearer" or "basic" once a challenge was seen
        self._challenge: dict[str, str] = {}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin_of(request.url) != self._origin:
            request.headers.pop("Authorization", None)
            yield request  # another host's (an upload Location elsewhere): none of our credentials
            return
        scope = _scope_for(request)
        self._apply(request, scope)
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = _parse_challenge(response.headers.get("www-authenticate", ""))
        if scheme == "basic" and self._use_basic(request):
            response = yield request
        elif scheme == "bearer" and "realm" in params:
            response = yield from self._with_fresh_token(request, params, params.get("scope") or scope)
        if response.status_code == 401:
            raise self._refused(request)

    def _use_basic(self, request: httpx.Request) -> bool:
        """Put Basic credentials on ``request``; False when there are none, or when this request
        already carried them and was refused."""
        creds = self._lookup(self._host)
        if creds is None or "Authorization" in request.headers:
            return False
        with self._lock:
            self._scheme = "basic"
        request.headers["Authorization"] = _basic(creds)
        return True

    def _with_fresh_token(
        self, request: httpx.Request, params: dict[str, str], scope: str
    ) -> Generator[httpx.Request, httpx.Response, httpx.Response]:
        with self._lock:
            self._scheme, self._challenge = "bearer", params
            self._tokens.pop(scope, None)
        token = self._fetch_token(request, params, scope)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        return response

    def _fetch_token(self, request: httpx.Request, params: dict[str, str], scope: str) -> str:
        """One token exchange with the realm, checked before anything is sent, bounded in time
        and size; every failure is a RegistryError (temporary only for network trouble and
        server-side statuses)."""
        token_request = self._token_request(self._realm(request, params["realm"]), params, scope)
        shown = redact(token_request.url)
        what = f"token for {self._host} from {shown}"
        try:  # through the client's own send(), which gives the request the client's timeouts
            with waits.exchange(self._deadline):
                response = self._token_http.send(token_request, stream=True)
                try:
                    body = _read_at_most(response, MAX_TOKEN_SIZE + 1)
                finally:
                    response.close()
        except httpx.TransportError as exc:
            raise error_from_transport(exc, what=what) from None
        if len(body) > MAX_TOKEN_SIZE:
            raise RegistryError(f"{what}: the answer is larger than {MAX_TOKEN_SIZE // 1024} KiB; refusing it "
                                "(a token realm that is not a token server?)", url=shown)
        return self._remember(response, body, scope)

    def _realm(self, request: httpx.Request, realm: str) -> httpx.URL:
        """The realm as a URL fit to receive credentials, else a permanent RegistryError."""
        try:
            url = httpx.URL(realm)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise RegistryError(f"{self._host}: its token realm is not a valid URL; the registry is misconfigured") \
                from None
        if url.scheme not in ("http", "https") or not url.host:
            raise RegistryError(f"{self._host}: refusing token realm {redact(url)} (not an http or https URL)")
        if request.url.scheme == "https" and url.scheme == "http" and not self._insecure:
            raise RegistryError(
                f"{self._host}: refusing token realm {redact(url)}: it would move credentials from https to "
                "plain http; use --insecure only on a trusted network", url=redact(url),
            )
        return url

    def _refused(self, request: httpx.Request) -> RegistryError:
        """The final 401, after fresh credentials or with none to send: permanent, one line
        naming the host and how to log in (never the credentials themselves)."""
        match = _REPO_PATH.match(request.url.path)
        what = f"{self._host}/{match.group(1)}" if match else self._host
        state = "refused the credentials" if self._lookup(self._host) else "needs credentials"
        return RegistryError(
            f"{what}: registry {state} (401){_login_hint(self._host)}",
            status=401, method=request.method, url=redact(request.url),
        )

    def _apply(self, request: httpx.Request, scope: str) -> None:
        with self._lock:
            scheme = self._scheme
            cached = self._tokens.get(scope)
        if scheme == "basic":
            creds = self._lookup(self._host)
            if creds:
                request.headers["Authorization"] = _basic(creds)
        elif scheme == "bearer" and cached and cached[1] > time.monotonic():
            request.headers["Authorization"] = f"Bearer {cached[0]}"

    def _token_request(self, realm: httpx.URL, params: dict[str, str], scope: str) -> httpx.Request:
        query = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
        creds = self._lookup(self._host)
        if creds is not None and creds.username == IDENTITY_TOKEN_USER:
            form = {"grant_type": "refresh_token", "refresh_token": creds.password, "client_id": CLIENT_ID}
            return httpx.Request("POST", realm, data={**form, **query})
        request = httpx.Request("GET", realm, params=query)
        if creds is not None:
            request.headers["Authorization"] = _basic(creds)
        return request

    def _remember(self, response: httpx.Response, body: bytes, scope: str) -> str:
        if response.status_code != 200:
            raise error_from_response(
                response, body, what=f"token for {self._host}", hint=_login_hint(self._host)
            )
        try:
            doc = json.loads(body)
            token = str(doc.get("token") or doc.get("access_token") or "")
            lifetime = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token, lifetime = "", 0.0
        if not token:
            raise RegistryError(f"token server for {self._host} answered without a token", temporary=True)
        with self._lock:
            # Renew 10 s early so a request never leaves with a token about to lapse.
            self._tokens[scope] = (token, time.monotonic() + max(1.0, lifetime - 10))
        return token


def _origin_of(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _read_at_most(response: httpx.Response, cap: int) -> bytes:
    """Up to ``cap`` bytes of the body, never more in memory."""
    data = bytearray()
    for chunk in response.iter_raw(65536):
        data += chunk[: cap - len(data)]
        if len(data) >= cap:
            break
    return bytes(data)


def _scope_for(request: httpx.Request) -> str:
    match = _REPO_PATH.match(request.url.path)
    return f"repository:{match.group(1)}:pull" if match else ""


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM.findall(rest))


def _basic(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _login_hint(host: str) -> str:
    return (
        f"; log in with `tart login {host}` or `docker login {host}`, "
        "or set TART_REGISTRY_USERNAME and TART_REGISTRY_PASSWORD"
    )
