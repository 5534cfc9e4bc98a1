"""Registry authentication as an httpx.Auth flow: send, read the 401 challenge, get a token, send again.

Token auth: https://distribution.github.io/distribution/spec/auth/token/ . Tokens are cached per
(realm, service, scope) until shortly before they expire, so a long blob download that outlives
its token re-authenticates once on the 401 and carries on. A 401 that survives a fresh token or
fresh Basic credentials is final: never retried in a loop.

An identity token (``Credentials(IDENTITY_TOKEN_USER, token)``, what ``docker login`` stores for
registries that issue one) is traded for access tokens with an OAuth2 refresh-token grant:
https://distribution.github.io/distribution/spec/auth/oauth/ .
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import httpx

from ..errors import RegistryError
from .errors import error_from_response, redact

__all__ = ["IDENTITY_TOKEN_USER", "CredentialLookup", "Credentials", "RegistryAuth"]

#: The username that marks a password as an identity (OAuth2 refresh) token, as Docker writes it.
IDENTITY_TOKEN_USER = "<token>"
#: The ``client_id`` sent with OAuth2 grants.
CLIENT_ID = "tartflow"

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

    def __init__(self, host: str, lookup: CredentialLookup = _no_credentials) -> None:
        self._host = host
        self._lookup = lookup
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, expiry)
        self._scheme: str | None = None  # "bearer" or "basic" once a challenge was seen
        self._challenge: dict[str, str] = {}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
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
        token_response = yield self._token_request(params, scope)
        token_response.read()
        token = self._remember(token_response, scope)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        return response

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

    def _token_request(self, params: dict[str, str], scope: str) -> httpx.Request:
        query = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
        creds = self._lookup(self._host)
        if creds is not None and creds.username == IDENTITY_TOKEN_USER:
            form = {"grant_type": "refresh_token", "refresh_token": creds.password, "client_id": CLIENT_ID}
            return httpx.Request("POST", params["realm"], data={**form, **query})
        request = httpx.Request("GET", params["realm"], params=query)
        if creds is not None:
            request.headers["Authorization"] = _basic(creds)
        return request

    def _remember(self, response: httpx.Response, scope: str) -> str:
        if response.status_code != 200:
            raise error_from_response(
                response, response.content, what=f"token for {self._host}", hint=_login_hint(self._host)
            )
        try:
            doc = response.json()
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
