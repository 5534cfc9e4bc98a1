"""Findings of a hostile-registry audit (issue 18, network and credential side), each against
the hostile stand-in in tests/support/hostile.py: bounded waits, capped token answers, no
credentials where they do not belong, permanent errors that stay permanent.

Time bounds are "ended before N s" with generous N; a wait that never ends fails the test
after ``HUNG`` seconds instead of holding the run.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartflow import cancel, credentials
from tartflow.context import PullSettings, registry_source
from tartflow.errors import InterruptedPull, RegistryError, RetriesExhaustedError, UsageError
from tartflow.reference import parse_reference
from tartflow.registry import push
from tartflow.registry.auth import Credentials
from tartflow.registry.client import ClientSettings, RegistryClient
from tartflow.registry.mirrors import parse_mirrors
from tartflow.registry.retry import RetryPolicy, retrying
from tests.support.cli import Tartflow
from tests.support.hostile import HostileServer, ended_within, endless, hang, reply, trickle
from tests.support.tls import make_ca_and_server_cert

HUNG = 60.0
QUICK = ClientSettings(insecure=True, connect_timeout=2.0, read_timeout=2.0)  # deadline: 6 s
PATIENT = ClientSettings(insecure=True, connect_timeout=2.0, read_timeout=120.0)
DIGEST = "sha256:" + "ab" * 32
MANIFEST = b'{"schemaVersion":2}'


def bearer(realm: str):
    return reply(401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="hostile"'})


def basic_guard(then):
    """401 Basic until a request carries Authorization, then ``then``."""
    challenge = reply(401, {"WWW-Authenticate": 'Basic realm="hostile"'})
    return lambda handler: (then if "authorization" in handler.headers else challenge)(handler)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def server() -> Iterator[HostileServer]:
    with HostileServer() as hostile:
        yield hostile


@pytest.fixture
def other() -> Iterator[HostileServer]:
    with HostileServer() as hostile:
        yield hostile


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileServer]:
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    with HostileServer(cert, key) as hostile:
        yield hostile


@pytest.fixture(autouse=True)
def closing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every RegistryClient a test opens is closed after it (pytest turns leaks into errors)."""
    opened: list[RegistryClient] = []
    original = RegistryClient.__init__

    def init(self: RegistryClient, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        opened.append(self)

    monkeypatch.setattr(RegistryClient, "__init__", init)
    yield
    for client in opened:
        client.close()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No credentials but the ones a test gives; no stop request left behind."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    for name in ("TART_REGISTRY_USERNAME", "TART_REGISTRY_PASSWORD", "TART_REGISTRY_HOSTNAME", "TARTFLOW_MIRRORS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(credentials, "_given", {})
    cancel.reset()
    yield
    cancel.reset()


def stop_after(seconds: float) -> None:
    timer = threading.Timer(seconds, cancel.request_stop)
    timer.daemon = True
    timer.start()


def read_blob(client: RegistryClient) -> int:
    with client.open_blob("acme/vm", DIGEST) as blob:
        return sum(len(chunk) for chunk in blob.iter_bytes())


# --- 1. every network wait is bounded ---------------------------------------------------------


@pytest.mark.parametrize("resource", ["manifests/v1", f"blobs/{DIGEST}"])
def test_a_token_endpoint_that_never_answers_ends_within_the_timeouts(server: HostileServer, resource: str) -> None:
    """The blob case is a token renewed in the middle of a download (its 401 on a blob GET).
    The 2 s read timeout ends it, well before the 62 s overall deadline would."""
    server.on("GET", r"^/v2/", bearer(f"{server.url}/token")).on("GET", r"^/token", hang)
    client = RegistryClient(server.host, settings=ClientSettings(insecure=True, connect_timeout=58, read_timeout=2))
    call = (lambda: client.get_manifest("acme/vm", "v1")) if resource.startswith("manifests") \
        else (lambda: read_blob(client))
    elapsed, outcome = ended_within(HUNG, call)
    assert isinstance(outcome, RegistryError) and outcome.temporary, outcome
    assert elapsed < 20 and len(server.requests(r"^/token")) == 1


def test_a_hanging_token_endpoint_is_given_up_on_within_retry_for(server: HostileServer) -> None:
    """Its 120 s read timeout never comes into it: the exchange ends with the 12 s budget."""
    server.on("GET", r"^/v2/", bearer(f"{server.url}/token")).on("GET", r"^/token", hang)
    client = RegistryClient(server.host, settings=PATIENT)
    policy = RetryPolicy(retry_for=12)
    elapsed, outcome = ended_within(HUNG, lambda: retrying(lambda: client.get_manifest("acme/vm", "v1"), policy))
    assert isinstance(outcome, RetriesExhaustedError) and isinstance(outcome.__cause__, RegistryError), outcome
    assert elapsed < 30


@pytest.mark.parametrize("hung", ["token", "blob stream"])
def test_ctrl_c_ends_a_network_wait_within_5_s(server: HostileServer, hung: str) -> None:
    if hung == "token":
        server.on("GET", r"^/v2/", bearer(f"{server.url}/token")).on("GET", r"^/token", hang)
    else:  # headers, then silence well inside the 120 s read timeout
        server.on("GET", r"^/v2/acme/vm/blobs/", trickle(1000, 600, "application/octet-stream"))
    client = RegistryClient(server.host, settings=PATIENT)
    stop_after(1.0)
    elapsed, outcome = ended_within(HUNG, lambda: read_blob(client))
    assert isinstance(outcome, InterruptedPull), outcome
    assert elapsed < 6


@pytest.mark.parametrize("trickled", ["manifest", "token for a manifest", "token renewed for a blob"])
def test_a_trickled_answer_ends_at_the_overall_deadline(server: HostileServer, trickled: str) -> None:
    """One byte every 0.2 s never trips a 2 s read timeout; the 6 s deadline ends it. A blob
    stream has no overall deadline (it may take hours), so only the token's own bounds that case."""
    slow = trickle(10_000, 0.2, "application/json")
    if trickled == "manifest":
        server.on("GET", r"^/v2/acme/vm/manifests/", slow)
    else:
        server.on("GET", r"^/v2/", bearer(f"{server.url}/token")).on("GET", r"^/token", slow)
    client = RegistryClient(server.host, settings=QUICK)
    call = (lambda: read_blob(client)) if trickled.endswith("blob") else (lambda: client.get_manifest("acme/vm", "v1"))
    elapsed, outcome = ended_within(HUNG, call)
    assert isinstance(outcome, RegistryError) and outcome.temporary, outcome
    assert elapsed < 20
    assert sum(server.sent.values()) < 10_000


# --- 2. token answers are capped --------------------------------------------------------------


def test_a_huge_token_is_refused_once_without_being_read(server: HostileServer) -> None:
    size = 256 * 1024 * 1024
    server.on("GET", r"^/v2/", bearer(f"{server.url}/token?sig=secret")).on("GET", r"^/token", endless(size))
    client = RegistryClient(server.host, settings=QUICK)
    policy = RetryPolicy(retry_for=30)
    elapsed, outcome = ended_within(HUNG, lambda: retrying(lambda: client.get_manifest("acme/vm", "v1"), policy))
    assert isinstance(outcome, RegistryError) and not outcome.temporary, outcome
    assert "64 KiB" in outcome.message and f"{server.url}/token" in outcome.message
    assert "secret" not in outcome.message and "\n" not in outcome.message
    assert len(server.requests(r"^/token")) == 1  # permanent: not asked again
    assert server.sent["/token"] < 32 * 1024 * 1024  # reading stopped near the cap
    assert elapsed < 20


# --- 5. permanent means permanent -------------------------------------------------------------


@pytest.mark.parametrize("realm", ["file:///etc/passwd", "ftp://127.0.0.1/token", "http://[::1"])
def test_a_realm_that_cannot_be_used_is_one_permanent_line(server: HostileServer, realm: str) -> None:
    server.on("GET", r"^/v2/", bearer(realm))
    client = RegistryClient(server.host, settings=QUICK)
    policy = RetryPolicy(retry_for=30)
    elapsed, outcome = ended_within(HUNG, lambda: retrying(lambda: client.get_manifest("acme/vm", "v1"), policy))
    assert isinstance(outcome, RegistryError) and not outcome.temporary, repr(outcome)
    assert "\n" not in outcome.message and server.host in outcome.message
    assert len(server.requests(r"/manifests/")) == 1
    assert elapsed < 10


# --- 4. credentials go where they belong ------------------------------------------------------


def test_an_https_registry_cannot_move_its_realm_to_plain_http(tls: HostileServer, other: HostileServer) -> None:
    tls.on("GET", r"^/v2/", bearer(f"{other.url}/token"))
    other.on("GET", r"^/token", reply(200, {"Content-Type": "application/json"}, b'{"token": "t"}'))
    client = RegistryClient(tls.host, settings=ClientSettings(connect_timeout=2.0, read_timeout=2.0),
                            credentials=lambda host: Credentials("fleet", "s3cret"))
    _, outcome = ended_within(HUNG, lambda: client.get_manifest("acme/vm", "v1"))
    assert isinstance(outcome, RegistryError) and not outcome.temporary, outcome
    assert "plain http" in outcome.message and "s3cret" not in outcome.message
    assert other.seen == []


def test_a_blob_redirect_from_https_to_plain_http_is_refused(tls: HostileServer, other: HostileServer) -> None:
    tls.on("GET", r"^/v2/acme/vm/blobs/", reply(307, {"Location": f"{other.url}/cdn/blob?X-Sig=Zq9sig"}))
    client = RegistryClient(tls.host, settings=ClientSettings(connect_timeout=2.0, read_timeout=2.0))
    _, outcome = ended_within(HUNG, lambda: read_blob(client))
    assert isinstance(outcome, RegistryError) and not outcome.temporary, outcome
    assert "Zq9sig" not in outcome.message
    assert other.seen == []


def test_an_upload_location_on_another_host_gets_no_credentials(server: HostileServer, other: HostileServer) -> None:
    """What ``tartflow copy`` does with the destination: POST, then PATCH where Location says."""
    server.on("POST", r"^/v2/acme/vm/blobs/uploads/$",
              basic_guard(reply(202, {"Location": f"{other.url}/upload/1"})))
    other.on("PATCH", r"^/upload/1$", reply(202, {"Location": f"{other.url}/upload/1"}))
    client = RegistryClient(server.host, settings=QUICK, credentials=lambda host: Credentials("fleet", "s3cret"))
    session = push.start_upload(client, "acme/vm")
    push.append(client, session, [b"bytes"])
    assert server.requests(r"/uploads/")[-1].headers.get("authorization") == basic("fleet", "s3cret")
    assert [s.method for s in other.seen] == ["PATCH"]
    assert "authorization" not in other.seen[0].headers


@pytest.fixture
def mirrored(server: HostileServer, other: HostileServer) -> tuple[HostileServer, HostileServer, PullSettings]:
    """``server`` is the registry (anonymous, serves the manifest); ``other`` a Basic-auth
    mirror that misses (404) once given credentials, logging every header it receives."""
    server.on("GET", r"^/v2/acme/vm/manifests/v1$", reply(200, {"Content-Type": "application/json"}, MANIFEST))
    other.on("GET", r"^/v2/", basic_guard(reply(404)))
    settings = PullSettings(insecure=True, read_timeout=2.0, mirrors={server.host: [other.url]})
    return server, other, settings


def _pull_manifest(server: HostileServer, settings: PullSettings) -> bytes:
    source = registry_source(settings, parse_reference(f"{server.host}/acme/vm:v1"))
    return source.get_manifest("acme/vm", "v1").raw


@pytest.mark.parametrize("given", ["environment without hostname", "registry's own entry"])
def test_registry_credentials_never_reach_a_mirror(
    mirrored: tuple[HostileServer, HostileServer, PullSettings], monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    server, mirror, settings = mirrored
    if given.startswith("environment"):
        monkeypatch.setenv("TART_REGISTRY_USERNAME", "fleet")
        monkeypatch.setenv("TART_REGISTRY_PASSWORD", "s3cret")
    else:
        credentials.use(server.host, Credentials("fleet", "s3cret"))
    assert _pull_manifest(server, settings) == MANIFEST
    assert mirror.seen and all("authorization" not in s.headers for s in mirror.seen)


def test_a_mirror_gets_its_own_hosts_credentials(
    mirrored: tuple[HostileServer, HostileServer, PullSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, mirror, settings = mirrored
    monkeypatch.setenv("TART_REGISTRY_USERNAME", "fleet")
    monkeypatch.setenv("TART_REGISTRY_PASSWORD", "s3cret")
    credentials.use(mirror.host, Credentials("cache", "m1rror"))
    assert _pull_manifest(server, settings) == MANIFEST
    sent = {s.headers.get("authorization") for s in mirror.seen} - {None}
    assert sent == {basic("cache", "m1rror")}


# --- 3. no userinfo in mirror URLs ------------------------------------------------------------

WITH_USERINFO = {"ghcr.io": ["http://fleet:s3cret@mirror.lan:5000"]}


def _says_where_credentials_go(message: str) -> None:
    assert "s3cret" not in message and "fleet" not in message
    assert "docker login mirror.lan:5000" in message and "Secret block" in message


def test_userinfo_in_a_mirror_url_is_refused_wherever_mirrors_come_from(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError) as parsed:
        parse_mirrors(json.dumps(WITH_USERINFO))
    _says_where_credentials_go(parsed.value.message)
    with pytest.raises(UsageError) as passed:  # the flow's ``mirrors`` parameter
        PullSettings.from_env(mirrors=WITH_USERINFO)
    _says_where_credentials_go(passed.value.message)
    monkeypatch.setenv("TARTFLOW_MIRRORS", json.dumps(WITH_USERINFO))
    with pytest.raises(UsageError):
        PullSettings.from_env()


def test_the_cli_refuses_userinfo_in_tartflow_mirrors_with_exit_2(tmp_path: Path) -> None:
    user = Tartflow(tmp_path / "tart", tmp_path / "prefect", None)
    result = user.run("pull", "--insecure", "--retry-for", "5s", "127.0.0.1:9/acme/vm:v1", timeout=120,
                      TARTFLOW_MIRRORS=json.dumps({"127.0.0.1:9": ["http://fleet:s3cret@mirror.lan:5000"]}))
    assert result.returncode == 2, result.stderr
    assert "s3cret" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert "Secret block" in result.stderr.splitlines()[-1]


def test_a_deployment_refuses_userinfo_in_mirrors_before_storing_the_run() -> None:
    """The flows' parameter schema (what the Prefect server enforces for deployment runs)."""
    import pydantic
    from prefect.utilities.callables import parameter_schema

    from flows.params import Mirrors
    from flows.pull import pull_image

    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(Mirrors).validate_python(WITH_USERINFO)
    pydantic.TypeAdapter(Mirrors).validate_python({"ghcr.io": ["http://mirror.lan:5000", "https://m.lan/v"]})
    assert "pattern" in json.dumps(parameter_schema(pull_image).model_dump())
