r"""Registry credentials the way Tart and Docker users already have them, first source wins.

1. ``TART_REGISTRY_USERNAME`` / ``TART_REGISTRY_PASSWORD``, for every registry host, or only for
   ``TART_REGISTRY_HOSTNAME`` when that is set (Tart's Credentials/EnvironmentCredentialsProvider).
   A pull-through mirror is not a registry the user named: ``lookup_mirror`` gives it these
   only when ``TART_REGISTRY_HOSTNAME`` is its own host.
2. Docker's ``config.json`` (``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``):
   ``credHelpers.<host>``, then ``auths.<host>`` (``identitytoken``, ``auth``,
   ``username``/``password``), then ``credsStore``. Tart reads only ``auths.<host>.auth`` and
   ``credHelpers``; Docker's own order is kept for the rest. A ``credHelpers`` key is tried as
   the exact host first, then every key as a regular expression matching the whole host, as
   Tart does (ECR-style ``.*\.dkr\.ecr\..*\.amazonaws\.com``); a key that is not a valid
   expression is skipped.
3. On macOS only, the Keychain item ``tart login HOST`` writes: an internet password labelled
   "Tart Credentials" for the host, read with ``security find-internet-password`` (keychain.py).

Credential helpers: https://github.com/docker/docker-credential-helpers (``get`` with the server
on stdin, JSON ``{"Username", "Secret"}`` on stdout; Username ``<token>`` means Secret is an
identity token). An identity token comes back as ``Credentials(IDENTITY_TOKEN_USER, token)``,
which the auth flow trades for access tokens with an OAuth2 refresh-token grant.

Contract: a source that fails (unreadable file, missing helper, helper error or timeout, bad
JSON) is skipped, never fatal, and nothing here ever puts a secret into a message or a log.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import keychain
from .registry.auth import IDENTITY_TOKEN_USER, Credentials

__all__ = ["HELPER_TIMEOUT", "IDENTITY_TOKEN_USER", "docker_config_path", "lookup", "lookup_mirror", "use"]

log = logging.getLogger(__name__)

#: Seconds a credential helper may take before it counts as failed.
HELPER_TIMEOUT = 10.0
#: Seconds a helper's answer is reused: Basic auth asks for credentials on every request, and a
#: keychain helper should not be spawned (or prompt) that often.
_HELPER_TTL = 300.0
# Docker files Docker Hub under its v1 index URL, whatever name the image was pulled by.
_DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_DOCKER_HUB_KEY = "https://index.docker.io/v1/"

_helper_cache: dict[tuple[str, str], tuple[float, Credentials | None]] = {}
_helper_lock = threading.Lock()


_given: dict[str, Credentials] = {}


def use(host: str, credentials: Credentials) -> None:
    """Credentials handed over in this process (a deployment's Prefect Secret block, loaded by
    the flow); they come before every other source, and are never written anywhere."""
    _given[host] = credentials


def lookup(host: str) -> Credentials | None:
    """Credentials for ``host`` (``name[:port]``) from the first source that has them, else
    None (anonymous). Never raises for a broken source; reads the environment and files anew
    on every call."""
    return _given.get(host) or _from_env(host) or _from_docker_config(host) or keychain.lookup(host)


def lookup_mirror(host: str) -> Credentials | None:
    """Credentials for a pull-through mirror at ``host``: only those keyed by its own host.
    ``TART_REGISTRY_USERNAME``/``PASSWORD`` without ``TART_REGISTRY_HOSTNAME`` mean "the
    registries I pull from", never a mirror in front of them."""
    return _given.get(host) or _from_env(host, named_only=True) or _from_docker_config(host)


def _from_env(host: str, *, named_only: bool = False) -> Credentials | None:
    user, password = os.environ.get("TART_REGISTRY_USERNAME"), os.environ.get("TART_REGISTRY_PASSWORD")
    only = os.environ.get("TART_REGISTRY_HOSTNAME")
    if user and password and (only == host or (not only and not named_only)):
        return Credentials(user, password)
    return None


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json`` when DOCKER_CONFIG is set, else ``~/.docker/config.json``."""
    directory = os.environ.get("DOCKER_CONFIG")
    return Path(directory) / "config.json" if directory else Path.home() / ".docker" / "config.json"


def _from_docker_config(host: str) -> Credentials | None:
    config = _read_config(docker_config_path())
    server = _DOCKER_HUB_KEY if host in _DOCKER_HUB else host
    helper = _helper_for(_mapping(config.get("credHelpers")), host)
    store = config.get("credsStore")
    sources: list[Callable[[], Credentials | None]] = [
        lambda: _from_helper(helper, server) if isinstance(helper, str) else None,
        lambda: _from_auths(_mapping(config.get("auths")), host),
        lambda: _from_helper(store, server) if isinstance(store, str) else None,
    ]
    for source in sources:
        creds = source()
        if creds is not None:
            return creds
    return None


def _helper_for(helpers: dict[str, Any], host: str) -> object:
    """The helper named for ``host``: its exact key, else the first key matching it as a regex."""
    if host in helpers:
        return helpers[host]
    for pattern, helper in helpers.items():
        try:
            if re.fullmatch(pattern, host):
                return helper
        except re.error:
            log.debug("ignoring a credHelpers key that is not a regular expression")
    return None


def _read_config(path: Path) -> dict[str, Any]:
    """The parsed file, or {} when it is missing or not a JSON object (logged without content)."""
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.debug("ignoring Docker config %s: %s", path, type(exc).__name__)
        return {}
    return _mapping(config)


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# --- auths ------------------------------------------------------------------------------------


def _auth_entry(auths: dict[str, Any], host: str) -> dict[str, Any]:
    """The entry for ``host``: its exact key first, then any key that Docker's
    ``ConvertToHostname`` reduces to it (``https://host``, ``host/v1/``)."""
    if isinstance(auths.get(host), dict):
        return _mapping(auths[host])
    wanted = "index.docker.io" if host in _DOCKER_HUB else host
    for key, entry in auths.items():
        if isinstance(entry, dict) and _hostname(key) == wanted:
            return entry
    return {}


def _hostname(key: str) -> str:
    for scheme in ("http://", "https://"):
        key = key.removeprefix(scheme)
    return key.split("/", 1)[0]


def _from_auths(auths: dict[str, Any], host: str) -> Credentials | None:
    """Docker's order within one entry: an identity token wins over a password."""
    entry = _auth_entry(auths, host)
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials(IDENTITY_TOKEN_USER, token)
    return _decode_auth(entry.get("auth")) or _plain(entry.get("username"), entry.get("password"))


def _decode_auth(value: object) -> Credentials | None:
    """``base64(user:password)``; None when absent, malformed or without a password."""
    if not isinstance(value, str) or not value:
        return None
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        log.debug("ignoring a Docker config auth value that is not base64 of user:password")
        return None
    return Credentials(user, password) if sep and user and password else None


def _plain(user: object, password: object) -> Credentials | None:
    if isinstance(user, str) and isinstance(password, str) and user and password:
        return Credentials(user, password)
    return None


# --- credential helpers -----------------------------------------------------------------------


def _from_helper(name: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-<name> get`` about ``server``; answers are reused for a while."""
    program = shutil.which(f"docker-credential-{name}") if name else None
    if program is None:
        log.debug("credential helper docker-credential-%s is not on PATH", name)
        return None
    key = (program, server)
    with _helper_lock:
        cached = _helper_cache.get(key)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    creds = _run_helper(program, server)
    with _helper_lock:
        _helper_cache[key] = (time.monotonic() + _HELPER_TTL, creds)
    return creds


def _run_helper(program: str, server: str) -> Credentials | None:
    """One ``get``; None on any failure. Its output may hold a secret, so it is never shown."""
    try:
        status, stdout = _communicate([program, "get"], server.encode(), HELPER_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("credential helper %s failed: %s", program, type(exc).__name__)
        return None
    if status != 0:
        # "credentials not found in native keychain" is the usual, harmless, case.
        log.debug("credential helper %s has nothing for %s (exit %d)", program, server, status)
        return None
    creds = _parse_helper_output(stdout)
    if creds is None:
        log.debug("credential helper %s answered without a username and secret", program)
    return creds


def _communicate(argv: list[str], data: bytes, timeout: float) -> tuple[int, bytes]:
    """Run ``argv`` with ``data`` on stdin: (exit status, stdout). On timeout its whole process
    group is killed (a wrapper script's children would otherwise hold stdout open) and
    TimeoutExpired raised. stderr is discarded: helpers may print secrets there too."""
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, start_new_session=True) as proc:
        try:
            stdout, _ = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return proc.returncode, stdout


def _parse_helper_output(stdout: bytes) -> Credentials | None:
    try:
        doc = _mapping(json.loads(stdout))
    except ValueError:
        return None
    return _plain(doc.get("Username"), doc.get("Secret"))
