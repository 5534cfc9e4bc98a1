"""TLS is verified by default; a custom CA comes in through SSL_CERT_FILE; an untrusted
certificate fails at once with advice, never in a retry loop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.checks import assert_pulled
from tests.support.cli import Tartflow
from tests.support.imagebuilder import BuiltImage, build_and_push
from tests.support.registry import Registry, start_registry
from tests.support.tls import make_ca_and_server_cert


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory, small_image: BuiltImage) -> Iterator[tuple[Registry, Path, BuiltImage]]:
    root = tmp_path_factory.mktemp("tls-registry")
    ca, cert, key = make_ca_and_server_cert(root)
    with start_registry(root / "plain") as plain:  # push over plain HTTP, then serve the same storage over TLS
        image = build_and_push(plain.url, "acme/tls", "v1", small_image.disk_path, layer_size=4 * 1024 * 1024)
    config = {"http": {"tls": {"certificate": str(cert), "key": str(key)}},
              "storage": {"filesystem": {"rootdirectory": str(root / "plain" / "storage")}}}
    with start_registry(root / "tls", extra_config=config) as server:
        yield server, ca, image


@pytest.mark.task_failures(r"RegistryError: .*TLS certificate .* is not trusted")
def test_untrusted_certificate_fails_fast_with_advice(user: Tartflow, tls_registry) -> None:
    server, _ca, image = tls_registry
    started = time.monotonic()
    result = user.run("pull", f"{server.host}/{image.repository}:{image.tag}")
    assert result.returncode == 1
    assert "not trusted" in result.stderr and "SSL_CERT_FILE" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_custom_ca_through_ssl_cert_file(user: Tartflow, tls_registry) -> None:
    server, ca, image = tls_registry
    result = user.run("pull", f"{server.host}/{image.repository}:{image.tag}", SSL_CERT_FILE=str(ca))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, server.host, image)
