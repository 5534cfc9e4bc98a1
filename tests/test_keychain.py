"""Credentials Tart users have beyond Docker's (issue 13): the Keychain item `tart login` writes,
read through a stand-in ``security`` program on PATH (the macOS branch forced), and
``credHelpers`` keys matched as regular expressions, as Tart does."""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from pathlib import Path

import pytest

from tartflow import credentials, keychain
from tartflow.registry.auth import Credentials

HOST = "registry.example.com:5000"


def _program(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _security(bin_dir: Path, host: str, user: str, password_line: str) -> Path:
    """Answers ``find-internet-password -s HOST -l "Tart Credentials" -g`` like macOS's tool:
    attributes on stdout, the password on stderr; exit 44 (not found) for anything else."""
    calls = bin_dir / "security.calls"
    _program(bin_dir, "security", f"""echo "$@" >> {calls}
[ "$1" = find-internet-password ] && [ "$2" = -s ] && [ "$3" = {json.dumps(host)} ] \\
  && [ "$4" = -l ] && [ "$5" = "Tart Credentials" ] && [ "$6" = -g ] || {{
  echo "security: SecKeychainSearchCopyNext: The specified item could not be found in the keychain." >&2; exit 44; }}
cat <<EOF
keychain: "/Users/runner/Library/Keychains/login.keychain-db"
class: "inet"
attributes:
    "acct"<blob>="{user}"
    "labl"<blob>="Tart Credentials"
    "srvr"<blob>="{host}"
EOF
echo '{password_line}' >&2
""")
    return calls


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No credentials anywhere but what a test adds; a private bin directory first on PATH."""
    for name in ("TART_REGISTRY_USERNAME", "TART_REGISTRY_PASSWORD", "TART_REGISTRY_HOSTNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(keychain, "ENABLED", True)  # the macOS branch, on any machine
    monkeypatch.setattr(credentials, "_helper_cache", {})
    monkeypatch.setattr(keychain, "_cache", {})
    return tmp_path / "bin"


def test_tart_login_keychain_item_is_read_last_and_never_logged(
    machine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    password = f"kc-{secrets.token_hex(12)}"
    calls = _security(machine, HOST, "tart-user", f'password: "{password}"')
    caplog.set_level(logging.DEBUG)
    assert credentials.lookup(HOST) == Credentials("tart-user", password)
    assert credentials.lookup("other.example.com") is None  # the item is for its host only
    assert password not in caplog.text and password not in calls.read_text()
    assert len(calls.read_text().splitlines()) == 2  # asked once per host, then reused
    assert credentials.lookup(HOST) == Credentials("tart-user", password)
    assert len(calls.read_text().splitlines()) == 2

    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": {HOST: {"username": "docker", "password": "d-pw"}}}))
    assert credentials.lookup(HOST) == Credentials("docker", "d-pw")  # Docker's config comes first
    monkeypatch.setenv("TART_REGISTRY_USERNAME", "env")
    monkeypatch.setenv("TART_REGISTRY_PASSWORD", "env-pw")
    assert credentials.lookup(HOST) == Credentials("env", "env-pw")  # and the environment before it


def test_keychain_password_in_hex_form(machine: Path) -> None:
    secret = "pä$$ word"
    _security(machine, HOST, "tart-user", f'password: 0x{secret.encode().hex().upper()}  "p\\303\\244$$ word"')
    assert credentials.lookup(HOST) == Credentials("tart-user", secret)


def test_keychain_is_consulted_only_on_macos(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _security(machine, HOST, "tart-user", 'password: "pw"')
    monkeypatch.setattr(keychain, "ENABLED", False)
    assert credentials.lookup(HOST) is None
    assert not calls.exists()


def test_cred_helpers_keys_match_exactly_first_then_as_regular_expressions(machine: Path, tmp_path: Path) -> None:
    for name, user in (("exact", "from-exact"), ("ecr", "from-regex")):
        _program(machine, f"docker-credential-{name}",
                 f'[ "$1" = get ] || exit 3\nread -r server\necho \'{{"Username": "{user}", "Secret": "s-{name}"}}\'\n')
    docker = tmp_path / "docker"
    docker.mkdir()
    helpers = {"[": "broken", r"\d+\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com": "ecr",
               "123.dkr.ecr.eu-west-1.amazonaws.com": "exact"}
    (docker / "config.json").write_text(json.dumps({"credHelpers": helpers}))
    assert credentials.lookup("123.dkr.ecr.eu-west-1.amazonaws.com") == Credentials("from-exact", "s-exact")
    assert credentials.lookup("456.dkr.ecr.us-east-1.amazonaws.com") == Credentials("from-regex", "s-ecr")
    assert credentials.lookup("456.dkr.ecr.us-east-1.amazonaws.com.evil.example") is None  # whole host only
