"""Credentials as Tart and Docker users have them: the lookup order on its own, then real pulls
from a real ``docker-registry`` behind htpasswd (Basic) and behind token auth with our token
server, through the fault proxy. Every secret is unique per run, so greps for it mean something:
no secret or issued token may show up in the CLI's output, TART_HOME, tartflow's store or the
Prefect server's files."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tartflow import credentials
from tartflow.registry.auth import Credentials
from tests.checks import assert_pulled, fetchable_bytes
from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage, build_and_push, make_disk
from tests.support.prefectserver import PrefectServer
from tests.support.registry import Registry, start_registry
from tests.support.tokenserver import TokenServer, bcrypt_hash, htpasswd_config

HOST = "registry.example.com:5000"
Result = subprocess.CompletedProcess[str]
ENV_VARS = ("TART_REGISTRY_USERNAME", "TART_REGISTRY_PASSWORD", "TART_REGISTRY_HOSTNAME")


def secret(kind: str = "pw") -> str:
    return f"{kind}-{secrets.token_hex(12)}"


def write_helper(bin_dir: Path, name: str, answers: dict[str, dict[str, str]], *, body: str = "") -> Path:
    """``docker-credential-<name>``: ``get`` answers ``answers[server]`` as JSON, or says
    "credentials not found" and exits 1; ``body`` replaces that logic when given."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    cases = "".join(f"  {json.dumps(server)}) echo {json.dumps(json.dumps(doc))};;\n" for server, doc in answers.items())
    script = body or (
        '[ "$1" = get ] || exit 3\nread -r server\ncase "$server" in\n'
        f'{cases}  *) echo "credentials not found in native keychain"; exit 1;;\nesac\n'
    )
    path = bin_dir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def write_config(directory: Path, config: dict[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# --- lookup on its own ------------------------------------------------------------------------


@pytest.fixture
def docker_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty DOCKER_CONFIG, no Tart variables, a private bin directory first on PATH."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "docker"


def test_env_credentials_win_and_honour_the_hostname(docker_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(docker_dir, {"auths": {HOST: {"auth": basic("docker", "from-file")}}})
    monkeypatch.setenv("TART_REGISTRY_USERNAME", "tart")
    monkeypatch.setenv("TART_REGISTRY_PASSWORD", "from-env")
    assert credentials.lookup(HOST) == Credentials("tart", "from-env")
    monkeypatch.setenv("TART_REGISTRY_HOSTNAME", "other.example.com")
    assert credentials.lookup(HOST) == Credentials("docker", "from-file")
    assert credentials.lookup("other.example.com") == Credentials("tart", "from-env")


def test_docker_order_helper_then_auths_then_store(docker_dir: Path, tmp_path: Path) -> None:
    write_helper(tmp_path / "bin", "mine", {HOST: {"Username": "helped", "Secret": "s1"}})
    write_helper(tmp_path / "bin", "store", {HOST: {"Username": "stored", "Secret": "s3"},
                                            "b.example.com": {"Username": "stored", "Secret": "s4"}})
    config = {
        "credHelpers": {HOST: "mine", "a.example.com": "mine"},
        "auths": {HOST: {"auth": basic("filed", "s2")}, "a.example.com": {"auth": basic("filed", "s5")}},
        "credsStore": "store",
    }
    write_config(docker_dir, config)
    assert credentials.lookup(HOST) == Credentials("helped", "s1")
    assert credentials.lookup("a.example.com") == Credentials("filed", "s5")  # helper has nothing: next
    assert credentials.lookup("b.example.com") == Credentials("stored", "s4")
    assert credentials.lookup("c.example.com") is None


@pytest.mark.parametrize("key", [HOST, f"https://{HOST}", f"http://{HOST}/v1/", f"{HOST}/v2/"])
def test_auths_keys_match_as_docker_writes_them(docker_dir: Path, key: str) -> None:
    write_config(docker_dir, {"auths": {"elsewhere.example.com": {"auth": basic("x", "y")}, key: {"auth": basic("u", "p")}}})
    assert credentials.lookup(HOST) == Credentials("u", "p")


def test_auths_entry_forms(docker_dir: Path) -> None:
    auths = {
        "token.example.com": {"auth": basic("u", ""), "identitytoken": "idt"},  # what docker login leaves
        "plain.example.com": {"username": "u", "password": "p"},
        "broken.example.com": {"auth": "%%% not base64", "username": "u2", "password": "p2"},
        "empty.example.com": {"auth": basic("u", "")},
        "index.docker.io/v1/": {"auth": basic("hub", "hp")},
    }
    write_config(docker_dir, {"auths": auths})
    assert credentials.lookup("token.example.com") == Credentials(credentials.IDENTITY_TOKEN_USER, "idt")
    assert credentials.lookup("plain.example.com") == Credentials("u", "p")
    assert credentials.lookup("broken.example.com") == Credentials("u2", "p2")
    assert credentials.lookup("empty.example.com") is None
    assert credentials.lookup("registry-1.docker.io") == Credentials("hub", "hp")


def test_home_docker_config_when_docker_config_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*ENV_VARS, "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    write_config(tmp_path / ".docker", {"auths": {HOST: {"auth": basic("u", "p")}}})
    assert credentials.docker_config_path() == tmp_path / ".docker" / "config.json"
    assert credentials.lookup(HOST) == Credentials("u", "p")


def test_helper_identity_token_and_server_on_stdin(docker_dir: Path, tmp_path: Path) -> None:
    write_helper(tmp_path / "bin", "idt", {HOST: {"ServerURL": HOST, "Username": "<token>", "Secret": "refresh"}})
    write_config(docker_dir, {"credsStore": "idt"})
    assert credentials.lookup(HOST) == Credentials(credentials.IDENTITY_TOKEN_USER, "refresh")


@pytest.mark.parametrize("failure", ["missing", "exit", "json", "stderr", "timeout"])
def test_failing_helpers_fall_through_without_leaking(
    docker_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    leaked = secret()
    bodies = {
        "exit": f"echo '{{\"Username\": \"u\", \"Secret\": \"{leaked}\"}}'; exit 2\n",
        "json": f"echo 'Username={leaked}'\n",
        "stderr": f"echo 'secret {leaked}' >&2; echo '{{\"Username\": \"u\"}}'\n",
        "timeout": f"echo {leaked} >&2; sleep 30 & sleep 30\n",  # a child keeps stdout open too
    }
    if failure != "missing":
        write_helper(tmp_path / "bin", "bad", {}, body=bodies[failure])
    write_config(docker_dir, {"credHelpers": {HOST: "bad"}, "auths": {HOST: {"auth": basic("u", "p")}}})
    monkeypatch.setattr(credentials, "HELPER_TIMEOUT", 0.5)
    caplog.set_level(logging.DEBUG, logger="tartflow.credentials")
    started = time.monotonic()
    assert credentials.lookup(HOST) == Credentials("u", "p")
    assert time.monotonic() - started < 5
    assert leaked not in caplog.text
    assert "docker-credential-bad" in caplog.text  # the failure is logged, without the secret


def test_unreadable_config_is_no_credentials(docker_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text('{"auths": {"h": {"auth": "c2VjcmV0"')
    caplog.set_level(logging.DEBUG, logger="tartflow.credentials")
    assert credentials.lookup("h") is None
    assert "c2VjcmV0" not in caplog.text
    (docker_dir / "config.json").write_text('["not", "an", "object"]')
    assert credentials.lookup("h") is None


def test_helper_answers_are_reused(docker_dir: Path, tmp_path: Path) -> None:
    count = tmp_path / "count"
    write_helper(tmp_path / "bin", "counting", {}, body=(
        f'echo x >> "{count}"\necho \'{{"Username": "u", "Secret": "s"}}\'\n'))
    write_config(docker_dir, {"credsStore": "counting"})
    for _ in range(5):
        assert credentials.lookup(HOST) == Credentials("u", "s")
    assert count.read_text().count("x") == 1


def test_bcrypt_matches_openbsd_vectors() -> None:
    assert bcrypt_hash("U*U", cost=5, salt="CCCCCCCCCCCCCCCCCCCCC.").endswith("E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW")
    assert bcrypt_hash("", cost=6, salt="DCq7YPn5Rq63x1Lad4cll.").endswith("TV4S6ytwfsfvkgY8jIucDrjc8deX1s.")


# --- real registries --------------------------------------------------------------------------

BASIC_USER, TOKEN_USER = "alice", "bob"
BASIC_PW, TOKEN_PW = secret(), secret()


@dataclass
class Secured:
    registry: Registry
    image: BuiltImage
    tokens: TokenServer | None = None


def _disk(directory: Path, size: int, seed: int, pattern: str = "mixed") -> Path:
    path = directory / "disk.img"
    make_disk(path, size, seed=seed, pattern=pattern)
    return path


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """htpasswd (Basic) auth; ``acme/basic:v1``, a 1.5 MiB disk in three layers."""
    root = tmp_path_factory.mktemp("basic-registry")
    config = htpasswd_config(root / "htpasswd", {BASIC_USER: BASIC_PW})
    with start_registry(root / "server", extra_config=config) as registry:
        disk = _disk(root, 3 << 19, seed=11)
        image = build_and_push(registry.url, "acme/basic", "v1", disk, layer_size=1 << 19, auth=(BASIC_USER, BASIC_PW))
        yield Secured(registry, image)


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """Token auth with our token server; ``acme/private:v1`` (no anonymous pull), a 3 MiB
    incompressible disk in three 1 MiB layers, so a throttled pull takes a known time."""
    root = tmp_path_factory.mktemp("token-registry")
    with TokenServer(root, {TOKEN_USER: TOKEN_PW}, public=["acme/public"]) as tokens, \
            start_registry(root / "server", extra_config=tokens.registry_config()) as registry:
        disk = _disk(root, 3 << 20, seed=12, pattern="random")
        auth = tokens.push_auth(TOKEN_USER, "acme/private")
        image = build_and_push(registry.url, "acme/private", "v1", disk, layer_size=1 << 20, auth=auth)
        yield Secured(registry, image, tokens)


@pytest.fixture
def token_server(token_registry: Secured) -> Iterator[TokenServer]:
    """The token server, its lifetimes restored after the test."""
    assert token_registry.tokens is not None
    yield token_registry.tokens
    token_registry.tokens.expires_in, token_registry.tokens.valid_for = 300, None


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """CLI environment with no credentials from the machine: an empty DOCKER_CONFIG, Tart's
    variables blank, a private bin directory first on PATH."""
    (tmp_path / "docker").mkdir()
    env = {name: "" for name in ENV_VARS}
    env.update(DOCKER_CONFIG=str(tmp_path / "docker"), PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return env


def pull(user: Tartflow, proxy: FaultProxy, image: BuiltImage, env: dict[str, str], *args: str) -> Result:
    return user.run("pull", "--insecure", f"{proxy.host}/{image.repository}:{image.tag}", *args, timeout=120, **env)


def assert_no_secrets(result: Result, user: Tartflow, server: PrefectServer, needles: list[str]) -> None:
    """No needle in the CLI's output, nor in any file under TART_HOME (which holds tartflow's
    store), the CLI's Prefect home or the Prefect server's home (its sqlite database included)."""
    for needle in needles:
        assert needle not in result.stdout and needle not in result.stderr
    roots = [user.tart_home, user.prefect_home, server.home]
    files = [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".db" for p in files), "the Prefect database was not found, so not searched"
    for path in files:
        data = path.read_bytes()
        found = [n for n in needles if n.encode() in data]
        assert not found, f"{path} holds a secret"


def assert_refused_fast(result: Result, proxy: FaultProxy, started: float, *, max_requests: int) -> None:
    """Exit 1 within seconds, one error line naming the host and how to log in, no retry loop."""
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 30
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("tartflow: error: "), result.stderr
    assert proxy.host in errors[0] and "401" in errors[0]
    assert f"tart login {proxy.host}" in errors[0] and "docker login" in errors[0]
    assert "TART_REGISTRY_USERNAME" in errors[0] and "Traceback" not in result.stderr
    manifest_gets = [r for r in proxy.requests if "/manifests/" in r.path]
    assert 1 <= len(manifest_gets) <= max_requests, proxy.requests
    assert not any("/blobs/" in r.path for r in proxy.requests)


# htpasswd


def test_basic_auth_pull_with_tart_environment(
    user: Tartflow, basic_registry: Secured, clean_env: dict[str, str], prefect_server: PrefectServer
) -> None:
    with FaultProxy(basic_registry.registry.url) as proxy:
        env = {**clean_env, "TART_REGISTRY_USERNAME": BASIC_USER, "TART_REGISTRY_PASSWORD": BASIC_PW,
               "TART_REGISTRY_HOSTNAME": proxy.host}
        result = pull(user, proxy, basic_registry.image, env)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, basic_registry.image)
    assert_no_secrets(result, user, prefect_server, [BASIC_PW, basic(BASIC_USER, BASIC_PW)])


def test_basic_auth_pull_with_docker_config_auths(
    user: Tartflow, basic_registry: Secured, clean_env: dict[str, str], prefect_server: PrefectServer
) -> None:
    with FaultProxy(basic_registry.registry.url) as proxy:
        write_config(Path(clean_env["DOCKER_CONFIG"]), {"auths": {f"https://{proxy.host}": {"auth": basic(BASIC_USER, BASIC_PW)}}})
        result = pull(user, proxy, basic_registry.image, clean_env)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, basic_registry.image)
    assert_no_secrets(result, user, prefect_server, [BASIC_PW, basic(BASIC_USER, BASIC_PW)])


def test_basic_auth_pull_with_credential_helper(
    user: Tartflow, basic_registry: Secured, clean_env: dict[str, str], tmp_path: Path, prefect_server: PrefectServer
) -> None:
    with FaultProxy(basic_registry.registry.url) as proxy:
        write_helper(tmp_path / "bin", "tftest", {proxy.host: {"ServerURL": proxy.host, "Username": BASIC_USER, "Secret": BASIC_PW}})
        write_config(Path(clean_env["DOCKER_CONFIG"]), {"credHelpers": {proxy.host: "tftest"}})
        result = pull(user, proxy, basic_registry.image, clean_env)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, basic_registry.image)
    assert_no_secrets(result, user, prefect_server, [BASIC_PW, basic(BASIC_USER, BASIC_PW)])


@pytest.mark.task_failures(r"RegistryError: .*(needs|refused the) credentials \(401\)")
@pytest.mark.parametrize("password", [None, "wrong"])
def test_basic_auth_without_valid_credentials_fails_at_once(
    user: Tartflow, basic_registry: Secured, clean_env: dict[str, str], password: str | None
) -> None:
    wrong = secret("wrong") if password else ""
    with FaultProxy(basic_registry.registry.url) as proxy:
        env = {**clean_env, "TART_REGISTRY_USERNAME": BASIC_USER, "TART_REGISTRY_PASSWORD": wrong} if password else clean_env
        started = time.monotonic()
        result = pull(user, proxy, basic_registry.image, env)
        assert_refused_fast(result, proxy, started, max_requests=2)
    assert ("refused the credentials" if password else "needs credentials") in result.stderr
    if password:
        assert wrong not in result.stdout + result.stderr


# token auth


@pytest.mark.task_failures(r"RegistryError: .*(needs|refused the) credentials \(401\)")
def test_token_auth_anonymous_is_refused_and_wrong_password_too(
    user: Tartflow, token_registry: Secured, token_server: TokenServer, clean_env: dict[str, str]
) -> None:
    wrong = secret("wrong")
    cases = [(clean_env, "needs credentials"),
             ({**clean_env, "TART_REGISTRY_USERNAME": TOKEN_USER, "TART_REGISTRY_PASSWORD": wrong}, "refused")]
    for env, expected in cases:
        with FaultProxy(token_registry.registry.url) as proxy:
            started = time.monotonic()
            result = pull(user, proxy, token_registry.image, env)
            assert_refused_fast(result, proxy, started, max_requests=2)
        assert expected in result.stderr and wrong not in result.stdout + result.stderr


def test_token_auth_pull_with_tart_environment(
    user: Tartflow, token_registry: Secured, token_server: TokenServer, clean_env: dict[str, str],
    prefect_server: PrefectServer,
) -> None:
    issued_before = len(token_server.issued)
    with FaultProxy(token_registry.registry.url) as proxy:
        env = {**clean_env, "TART_REGISTRY_USERNAME": TOKEN_USER, "TART_REGISTRY_PASSWORD": TOKEN_PW}
        result = pull(user, proxy, token_registry.image, env)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, token_registry.image)
    issued = token_server.issued[issued_before:]
    assert issued and all(i.subject == TOKEN_USER and i.grant == "basic" for i in issued)
    assert_no_secrets(result, user, prefect_server, [TOKEN_PW, *token_server.tokens()])


def test_token_auth_pull_with_identity_token(
    user: Tartflow, token_registry: Secured, token_server: TokenServer, clean_env: dict[str, str],
    prefect_server: PrefectServer,
) -> None:
    refresh = token_server.refresh_token_for(TOKEN_USER)
    issued_before = len(token_server.issued)
    with FaultProxy(token_registry.registry.url) as proxy:
        auths = {proxy.host: {"auth": basic(TOKEN_USER, ""), "identitytoken": refresh}}
        write_config(Path(clean_env["DOCKER_CONFIG"]), {"auths": auths})
        result = pull(user, proxy, token_registry.image, clean_env)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, token_registry.image)
    issued = token_server.issued[issued_before:]
    assert issued and all(i.grant == "refresh_token" for i in issued)
    assert_no_secrets(result, user, prefect_server, [refresh, *token_server.tokens()])


@pytest.mark.parametrize("announced", ["honest", "optimistic"])
def test_tokens_expiring_mid_download_are_renewed_and_the_pull_resumes(
    user: Tartflow, token_registry: Secured, token_server: TokenServer, clean_env: dict[str, str],
    prefect_server: PrefectServer, announced: str,
) -> None:
    """Tokens die 2 s after issue while a throttled pull takes several times that, and streams
    are cut so resumes need a new token. "honest": the server says expires_in=2, so the client
    renews early; "optimistic": it says 300, so only the registry's 401 tells the client."""
    token_server.valid_for = 2
    token_server.expires_in = 2 if announced == "honest" else 300
    image = token_registry.image
    issued_before = len(token_server.issued)
    with FaultProxy(token_registry.registry.url) as proxy:
        proxy.throttle(500_000)  # about 2 s per layer, 7 s in all
        proxy.cut_after(450_000, count=4)
        env = {**clean_env, "TART_REGISTRY_USERNAME": TOKEN_USER, "TART_REGISTRY_PASSWORD": TOKEN_PW}
        started = time.monotonic()
        result = pull(user, proxy, image, env, "--concurrency", "1")
        elapsed = time.monotonic() - started
        records = proxy.requests
        served = proxy.blob_bytes_served
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, image)
    assert elapsed > 3 * token_server.valid_for  # the pull really outlived several tokens
    assert len(token_server.issued) - issued_before >= 3, [(r.method, r.path[-30:], r.status, r.range_header, r.bytes_sent) for r in records]
    assert any(r.range_header for r in records if "/blobs/" in r.path)  # resumed, not restarted
    assert served <= fetchable_bytes(image) * 1.05
    blob_401s = [r for r in records if "/blobs/" in r.path and r.status == 401]
    if announced == "optimistic":
        assert blob_401s, "the registry never refused an expired token: the test proves nothing"
    assert_no_secrets(result, user, prefect_server, [TOKEN_PW, *token_server.tokens()])


# Prefect Secret block (deployments)


def test_credentials_from_a_prefect_secret_block(
    user: Tartflow, basic_registry: Secured, clean_env: dict[str, str], prefect_server: PrefectServer
) -> None:
    block = "registry-basic-" + secrets.token_hex(4)
    code = ("import sys\nfrom prefect.blocks.system import Secret\n"
            "Secret(value={'username': sys.argv[1], 'password': sys.argv[2]}).save(sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, BASIC_USER, BASIC_PW, block], env=user.env(), check=True,
                   capture_output=True, timeout=60)
    with FaultProxy(basic_registry.registry.url) as proxy:
        result = pull(user, proxy, basic_registry.image, clean_env, "--credentials-block", block)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, basic_registry.image)
    # The block holds the password (encrypted at rest by the server); nothing else may.
    assert_no_secrets(result, user, prefect_server, [BASIC_PW, basic(BASIC_USER, BASIC_PW)])
