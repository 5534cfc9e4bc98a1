"""Tart's reference grammar and digest validation: the gate before any path is built."""

from __future__ import annotations

import pytest

from tartflow.errors import InvalidReferenceError
from tartflow.reference import parse_reference, validate_digest

HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "host", "repository", "tag", "digest"),
    [
        ("ghcr.io/cirruslabs/macos-sequoia-base:latest", "ghcr.io", "cirruslabs/macos-sequoia-base", "latest", None),
        ("ghcr.io/cirruslabs/macos-sequoia-base", "ghcr.io", "cirruslabs/macos-sequoia-base", "latest", None),
        ("127.0.0.1:5000/acme/vm:v1", "127.0.0.1:5000", "acme/vm", "v1", None),
        (f"127.0.0.1:5000/acme/vm@sha256:{HEX}", "127.0.0.1:5000", "acme/vm", None, f"sha256:{HEX}"),
        ("localhost/a/b/c:1.0_rc-2", "localhost", "a/b/c", "1.0_rc-2", None),
        ("reg.example.com:443/a__b/c-d.e:T", "reg.example.com:443", "a__b/c-d.e", "T", None),
    ],
)
def test_parses_tart_references(text: str, host: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repository, tag, digest)
    assert ref.reference == (digest or tag)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "acme/vm:v1",  # no host
        "ubuntu",
        "ghcr.io/",
        "ghcr.io/Acme/vm",  # uppercase repository
        "ghcr.io/acme/../vm",
        "ghcr.io/acme/vm:",
        "ghcr.io/acme/vm:-bad",
        "ghcr.io/acme/vm@sha256:../../etc",
        f"ghcr.io/acme/vm@sha256:{'A' * 64}",
        "ghcr.io/acme//vm",
        " ghcr.io/acme/vm",
        "ghcr.io/acme/vm:tag with space",
        "ghcr.io/" + "a" * 300,
    ],
)
def test_refuses_malformed_references(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["sha256:../../x", f"sha512:{HEX}", f"sha256:{HEX}0", f"sha256:{HEX[:-1]}G", None, 5])
def test_digest_validation(value: object) -> None:
    with pytest.raises(InvalidReferenceError):
        validate_digest(value)
    assert validate_digest(f"sha256:{HEX}") == f"sha256:{HEX}"
