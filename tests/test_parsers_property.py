"""Arbitrary input to the reference and manifest parsers fails only with tartflow's own errors."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tartflow.errors import TartflowError
from tartflow.manifest import MAX_DISK_SIZE, parse_manifest, pick_from_index
from tartflow.reference import parse_reference

DIGEST = "sha256:" + "a" * 64
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=30,
)
layer_media = st.sampled_from([
    "application/vnd.cirruslabs.tart.config.v1", "application/vnd.cirruslabs.tart.disk.v2",
    "application/vnd.cirruslabs.tart.nvram.v1", "application/vnd.cirruslabs.tart.disk.v1", "x",
])
descriptors = st.fixed_dictionaries(
    {"mediaType": layer_media, "digest": st.sampled_from([DIGEST, "sha256:../x", "", "sha256:" + "A" * 64]),
     "size": st.integers(min_value=-5, max_value=2**70)},
    optional={"annotations": st.dictionaries(
        st.sampled_from(["org.cirruslabs.tart.uncompressed-size", "org.cirruslabs.tart.uncompressed-content-digest"]),
        st.text(max_size=30) | st.integers(min_value=0, max_value=10**30).map(str) | st.just(DIGEST))},
)
manifests = st.fixed_dictionaries(
    {"schemaVersion": st.just(2), "layers": st.lists(descriptors, max_size=6)},
    optional={"config": descriptors},
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_as_a_reference(text: str) -> None:
    try:
        ref = parse_reference(text)
    except TartflowError as exc:
        assert "\n" not in str(exc)
        return
    assert ".." not in ref.repository.split("/") and "/" not in (ref.tag or "")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=500), json_values.map(lambda v: json.dumps(v).encode()),
                 manifests.map(lambda v: json.dumps(v).encode())))
def test_any_bytes_as_a_manifest(raw: bytes) -> None:
    try:
        image = parse_manifest(raw, DIGEST)
    except TartflowError:
        return
    assert image.disk_size <= MAX_DISK_SIZE
    assert all(d.digest == DIGEST for d in image.blobs)
    assert all(layer.uncompressed_size >= 0 for layer in image.disk_layers)


platforms = st.one_of(
    st.none(),
    st.fixed_dictionaries({"os": st.sampled_from(["darwin", "linux", "windows"]),
                           "architecture": st.sampled_from(["arm64", "amd64", "arm"])}),
)
index_entries = st.fixed_dictionaries(
    {"mediaType": st.just("application/vnd.oci.image.manifest.v1+json"),
     "digest": st.sampled_from([DIGEST, "sha256:" + "b" * 64, "sha256:" + "c" * 64, "sha256:../x"]),
     "size": st.integers(min_value=-1, max_value=10_000)},
    optional={"platform": platforms},
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 json_values.map(lambda v: json.dumps({"manifests": v}).encode()),
                 st.lists(index_entries, max_size=5).map(lambda v: json.dumps({"manifests": v}).encode())))
def test_any_bytes_as_an_index(raw: bytes) -> None:
    """Whatever the index, the pick is the first darwin/arm64 entry, else the only entry, else
    a one-line ImageFormatError. Mutants it catches: ``pick_from_index`` returning the first
    entry whatever its platform, or refusing a lone entry without a platform."""
    try:
        picked = pick_from_index(raw)
    except TartflowError as exc:
        assert "\n" not in str(exc)
        return
    entries = [e for e in json.loads(raw)["manifests"]]
    mac = [e for e in entries if (e.get("platform") or {}) == {"os": "darwin", "architecture": "arm64"}]
    expected = mac[0] if mac else entries[0]
    assert len(mac) > 0 or len(entries) == 1
    assert (picked.digest, picked.size, picked.platform) == (expected["digest"], expected["size"], expected.get("platform"))
