"""The macOS Keychain item that ``tart login HOST`` writes, read as Tart reads it.

Tart (Credentials/KeychainCredentialsProvider.swift) stores an internet password with label
"Tart Credentials", server = the host as given (``name[:port]``), account = the user name.
``security find-internet-password -s HOST -l "Tart Credentials" -g`` prints the item's
attributes on stdout (``"acct"<blob>="user"``) and the password on stderr
(``password: "secret"``, or ``password: 0x<hex>  "..."`` when it is not plain ASCII).

Only on macOS (``ENABLED``, a module-level switch tests may force). Any failure (no item,
a locked keychain the user declines, no ``security``) means no credentials from here. The
secret never reaches a message or a log: only exit statuses are logged.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import threading
import time

from .registry.auth import Credentials

__all__ = ["ENABLED", "LABEL", "TIMEOUT", "TTL", "lookup"]

log = logging.getLogger(__name__)

ENABLED = sys.platform == "darwin"
LABEL = "Tart Credentials"
#: Seconds ``security`` may take (it may show a keychain prompt the user answers).
TIMEOUT = 60.0

_ACCOUNT = re.compile(rb'^\s*"acct"<blob>=(?:0x[0-9A-Fa-f]+\s+)?"(?P<value>.*)"\s*$', re.MULTILINE)
_PASSWORD = re.compile(rb'^password:\s*(?:0x(?P<hex>[0-9A-Fa-f]+)\s*(?:".*")?|"(?P<text>.*)")\s*$', re.MULTILINE)


#: Seconds an answer is reused: Basic auth asks for credentials on every request, and
#: ``security`` may prompt; a missing item is asked about again after the same time.
TTL = 300.0
_cache: dict[tuple[str, str], tuple[float, Credentials | None]] = {}
_cache_lock = threading.Lock()


def lookup(host: str) -> Credentials | None:
    if not ENABLED:
        return None
    program = shutil.which("security")
    if program is None:
        return None
    key = (program, host)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    creds = _ask(program, host)
    with _cache_lock:
        _cache[key] = (time.monotonic() + TTL, creds)
    return creds


def _ask(program: str, host: str) -> Credentials | None:
    try:
        done = subprocess.run([program, "find-internet-password", "-s", host, "-l", LABEL, "-g"],
                              capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("security find-internet-password failed: %s", type(exc).__name__)
        return None
    if done.returncode != 0:
        log.debug("no %r keychain item for %s (security exit %d)", LABEL, host, done.returncode)
        return None
    account, password = _ACCOUNT.search(done.stdout), _PASSWORD.search(done.stderr)
    if account is None or password is None:
        log.debug("the %r keychain item for %s has no account or password", LABEL, host)
        return None
    secret = bytes.fromhex(password["hex"].decode()) if password["hex"] is not None else password["text"]
    try:
        user, text = account["value"].decode(), secret.decode()
    except UnicodeDecodeError:
        return None
    return Credentials(user, text) if user and text else None
