"""Registry auth for tests: a token server for ``auth: token``, htpasswd files for ``auth: htpasswd``.

:class:`TokenServer` (stdlib HTTP in a thread) implements the token spec
https://distribution.github.io/distribution/spec/auth/token/ (GET, Basic credentials or none)
and its OAuth2 form https://distribution.github.io/distribution/spec/auth/oauth/ (POST,
``grant_type=refresh_token`` or ``password``), and issues JWTs
(https://distribution.github.io/distribution/spec/auth/jwt/) that a real ``docker-registry``
accepts. distribution's verifier (registry/auth/token/token.go) trusts a token whose ``x5c``
header chains to its ``rootcertbundle``, so the signing key's self-signed certificate is both the
bundle and the chain. It also accepts ``exp`` up to 60 s late (``Leeway``), so ``exp`` is written
60 s early: a token then stops working at the registry exactly ``valid_for`` seconds after issue.

Registry htpasswd files hold bcrypt hashes only; :func:`hash_password` uses ``htpasswd -B`` or
the ``bcrypt`` package when present, else :func:`bcrypt_hash`, a pure-Python bcrypt (slow, so
cost 4, the minimum; fine for a test password).
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Issued", "TokenServer", "bcrypt_hash", "hash_password", "htpasswd_config"]

LEEWAY = 60  # seconds distribution adds to exp (registry/auth/token/token.go)
ISSUER = "tartflow-test-issuer"
SERVICE = "tartflow-test-registry"


@dataclass(frozen=True)
class Issued:
    """One token handed out: to whom ('' for anonymous), how, for which scopes, and when."""

    subject: str
    grant: str  # "basic", "anonymous", "refresh_token" or "password"
    scopes: tuple[str, ...]
    token: str
    at: float


class TokenServer:
    """Issues registry tokens for ``users`` (name -> password) on 127.0.0.1.

    A known user gets ``pull,push`` on any repository asked for; anonymous callers get
    ``pull`` on ``public`` repositories only, and otherwise a token with no access (as Docker
    Hub does), which the registry then refuses. Wrong credentials get a 401. ``expires_in`` is
    what clients are told; ``valid_for`` (default: the same) is how long the registry accepts
    the token. Both may be changed while the server runs.
    """

    def __init__(
        self,
        directory: Path,
        users: dict[str, str],
        *,
        public: Iterable[str] = (),
        expires_in: float = 300,
        valid_for: float | None = None,
    ) -> None:
        self.users = dict(users)
        self.public = frozenset(public)
        self.expires_in = expires_in
        self.valid_for = valid_for
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user
        self.issued: list[Issued] = []
        self._lock = threading.Lock()
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = _self_signed(self._key)
        self.bundle = Path(directory) / "token-signer.pem"
        self.bundle.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._http: ThreadingHTTPServer | None = None

    # -- lifetime ----------------------------------------------------------------------------

    def start(self) -> Self:
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._http.daemon_threads = True
        self._http.token_server = self  # type: ignore[attr-defined]
        threading.Thread(target=self._http.serve_forever, name="token-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def realm(self) -> str:
        if self._http is None:
            raise RuntimeError("TokenServer is not running")
        return f"http://127.0.0.1:{self._http.server_address[1]}/token"

    def registry_config(self) -> dict[str, Any]:
        """``extra_config`` for :func:`tests.support.registry.start_registry`."""
        token = {"realm": self.realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": str(self.bundle)}
        return {"auth": {"token": token}}

    # -- what a test asks for ----------------------------------------------------------------

    def refresh_token_for(self, user: str) -> str:
        """A new identity (refresh) token for ``user``, as ``docker login`` would store it."""
        token = "rt-" + secrets.token_hex(16)
        with self._lock:
            self.refresh_tokens[token] = user
        return token

    def push_auth(self, user: str, repository: str) -> httpx.Auth:
        """Auth for :func:`tests.support.imagebuilder.build_and_push`: one ``pull,push`` token,
        sent up front (a streamed upload body cannot be replayed after a 401 challenge)."""
        return _Bearer(self.issue(user, "basic", [f"repository:{repository}:pull,push"])["token"])

    def tokens(self) -> list[str]:
        """Every access token issued so far."""
        with self._lock:
            return [issued.token for issued in self.issued]

    # -- issuing -----------------------------------------------------------------------------

    def issue(self, subject: str, grant: str, scopes: list[str]) -> dict[str, Any]:
        """The JSON answer for a caller already authenticated as ``subject`` ('' = anonymous)."""
        now = int(time.time())
        with self._lock:
            expires_in, valid_for = self.expires_in, self.valid_for
        lifetime = expires_in if valid_for is None else valid_for
        claims = {
            "iss": ISSUER, "sub": subject, "aud": SERVICE, "iat": now, "nbf": now,
            "exp": now + int(lifetime) - LEEWAY, "jti": secrets.token_hex(8),
            "access": [a for a in (self._access(subject, s) for s in scopes) if a],
        }
        token = self._sign(claims)
        with self._lock:
            self.issued.append(Issued(subject, grant, tuple(scopes), token, time.monotonic()))
        issued_at = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat()
        return {"token": token, "access_token": token, "expires_in": expires_in, "issued_at": issued_at}

    def _access(self, subject: str, scope: str) -> dict[str, Any] | None:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or not name:
            return None
        allowed = {"pull", "push"} if subject else ({"pull"} if name in self.public else set())
        granted = sorted(allowed & set(actions.split(",")))
        return {"type": "repository", "name": name, "actions": granted} if granted else None

    def _sign(self, claims: dict[str, Any]) -> str:
        cert = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        header = {"typ": "JWT", "alg": "ES256", "x5c": [cert]}
        signing_input = f"{_b64url(_json(header))}.{_b64url(_json(claims))}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def check_basic(self, header: str) -> str | None:
        """The user named by a valid ``Basic`` header, else None."""
        scheme, _, value = header.partition(" ")
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        ok = scheme.lower() == "basic" and user in self.users and secrets.compare_digest(self.users[user], password)
        return user if ok else None

    def check_form(self, form: dict[str, list[str]]) -> tuple[str, str] | None:
        """(user, grant) for a valid OAuth2 refresh-token or password grant, else None; the
        spec makes ``client_id`` mandatory, so a form without one is refused too."""
        grant = _first(form, "grant_type")
        if not _first(form, "client_id"):
            return None
        if grant == "refresh_token":
            with self._lock:
                user = self.refresh_tokens.get(_first(form, "refresh_token"))
            return (user, grant) if user else None
        if grant == "password":
            user, password = _first(form, "username"), _first(form, "password")
            if user in self.users and secrets.compare_digest(self.users[user], password):
                return user, grant
        return None


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        server: TokenServer = self.server.token_server  # type: ignore[attr-defined]
        query = parse_qs(urlsplit(self.path).query)
        header = self.headers.get("Authorization")
        if header is None:
            self._json(200, server.issue("", "anonymous", query.get("scope", [])))
            return
        user = server.check_basic(header)
        if user is None:
            self._json(401, _UNAUTHORIZED)
            return
        self._json(200, server.issue(user, "basic", query.get("scope", [])))

    def do_POST(self) -> None:
        server: TokenServer = self.server.token_server  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        checked = server.check_form(form)
        if checked is None:
            self._json(401, _UNAUTHORIZED)
            return
        scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
        answer = server.issue(checked[0], checked[1], scopes)
        self._json(200, {k: v for k, v in answer.items() if k != "token"} | {"scope": " ".join(scopes)})

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = _json(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


_UNAUTHORIZED = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}


def _first(form: dict[str, list[str]], key: str) -> str:
    return (form.get(key) or [""])[0]


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tartflow test token signer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


# --- htpasswd ---------------------------------------------------------------------------------


def htpasswd_config(path: Path, users: dict[str, str]) -> dict[str, Any]:
    """Write an htpasswd file for ``users`` at ``path``; ``extra_config`` for start_registry."""
    path.write_text("".join(f"{user}:{hash_password(pw)}\n" for user, pw in users.items()))
    return {"auth": {"htpasswd": {"realm": "tartflow-test", "path": str(path)}}}


def hash_password(password: str) -> str:
    """A bcrypt hash: ``htpasswd -B`` if installed, else the ``bcrypt`` package, else pure Python."""
    if shutil.which("htpasswd"):
        line = subprocess.run(["htpasswd", "-nbB", "-C", "4", "u", password], capture_output=True,
                              text=True, check=True).stdout
        return line.strip().split(":", 1)[1]
    try:
        import bcrypt  # type: ignore[import-not-found]
    except ImportError:
        return bcrypt_hash(password)
    return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode())


_STD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BCRYPT_B64 = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def bcrypt_hash(password: str, *, cost: int = 4, salt: str | None = None) -> str:
    """``$2b$`` bcrypt (Provos & Mazières, EksBlowfish) in pure Python; ``salt`` is 22 bcrypt-base64
    characters (random when None). Checked against the OpenBSD test vectors."""
    if salt is None:
        salt = base64.b64encode(secrets.token_bytes(16)).decode()[:22].translate(str.maketrans(_STD_B64, _BCRYPT_B64))
    raw_salt = base64.b64decode(salt.translate(str.maketrans(_BCRYPT_B64, _STD_B64)) + "==")[:16]
    key = (password.encode() + b"\0")[:72]
    state = _Blowfish()
    state.expand(key, raw_salt)
    for _ in range(1 << cost):
        state.expand(key, b"")
        state.expand(raw_salt, b"")
    words = [int.from_bytes(b"OrpheanBeholderScryDoubt"[i : i + 4], "big") for i in range(0, 24, 4)]
    for _ in range(64):
        for i in range(0, 6, 2):
            words[i], words[i + 1] = state.encrypt(words[i], words[i + 1])
    digest = b"".join(w.to_bytes(4, "big") for w in words)[:23]
    encoded = base64.b64encode(digest).decode().rstrip("=").translate(str.maketrans(_STD_B64, _BCRYPT_B64))
    return f"$2b${cost:02d}${salt}{encoded}"


class _Blowfish:
    """Blowfish's state, initialised from the hexadecimal digits of pi, and EksBlowfish's expand."""

    def __init__(self) -> None:
        words = _pi_words()
        self.p = words[:18]
        self.s = [words[18 + 256 * i : 18 + 256 * (i + 1)] for i in range(4)]

    def encrypt(self, left: int, right: int) -> tuple[int, int]:
        p, s0, s1, s2, s3 = self.p, *self.s
        for i in range(0, 16, 2):
            left ^= p[i]
            right ^= (((s0[left >> 24] + s1[(left >> 16) & 255]) ^ s2[(left >> 8) & 255]) + s3[left & 255]) & 0xFFFFFFFF
            right ^= p[i + 1]
            left ^= (((s0[right >> 24] + s1[(right >> 16) & 255]) ^ s2[(right >> 8) & 255]) + s3[right & 255]) & 0xFFFFFFFF
        return right ^ p[17], left ^ p[16]

    def expand(self, key: bytes, salt: bytes) -> None:
        """Mix ``key`` into P, then re-encrypt P and S, XOR-ing ``salt`` (cyclic, may be empty) in."""
        key_words = _cycle_words(key)
        self.p = [w ^ next(key_words) for w in self.p]
        salt_words = _cycle_words(salt) if salt else None
        left = right = 0
        for table in (self.p, *self.s):
            for i in range(0, len(table), 2):
                if salt_words is not None:
                    left ^= next(salt_words)
                    right ^= next(salt_words)
                left, right = self.encrypt(left, right)
                table[i], table[i + 1] = left, right


def _cycle_words(data: bytes) -> Any:
    """Endless big-endian 32-bit words read cyclically from ``data`` (bcrypt's stream2word)."""
    position = 0
    while True:
        word = 0
        for _ in range(4):
            word = (word << 8) | data[position % len(data)]
            position += 1
        yield word


_PI_WORDS: list[int] = []


def _pi_words(count: int = 18 + 4 * 256) -> list[int]:
    """The first ``count`` 32-bit words of pi's fractional part (Machin's formula, 64 guard bits)."""
    if not _PI_WORDS:
        bits = 32 * count + 64
        pi = 4 * (4 * _arctan_inverse(5, bits) - _arctan_inverse(239, bits))
        fraction = (pi - (3 << bits)) >> 64
        _PI_WORDS.extend((fraction >> (32 * (count - 1 - i))) & 0xFFFFFFFF for i in range(count))
    return list(_PI_WORDS)


def _arctan_inverse(x: int, bits: int) -> int:
    """arctan(1/x) as a fixed-point number with ``bits`` fractional bits."""
    power = (1 << bits) // x
    total, k, square = power, 1, x * x
    while power:
        power //= square
        term = power // (2 * k + 1)
        total += -term if k % 2 else term
        k += 1
    return total
