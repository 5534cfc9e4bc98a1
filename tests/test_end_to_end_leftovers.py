"""What earlier runs leave on a machine, met by the next pull on the real registry behind the
fault proxy (issue 20): a partial that already holds its whole blob, a Range the server says
it cannot satisfy, and a VM in Tart's cache whose disk was altered after it was installed."""

from __future__ import annotations

import json
import time

import httpx

from tests.checks import assert_pulled, fetchable_bytes, partial, vm_dir
from tests.conftest import SMALL_LAYER_SIZE
from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import OCI_MANIFEST, BuiltImage, push_raw_manifest
from tests.support.registry import Registry


def ref_of(proxy: FaultProxy, image: BuiltImage) -> str:
    return f"{proxy.host}/{image.repository}:{image.tag}"


def _blob(proxy: FaultProxy, image: BuiltImage, digest: str) -> bytes:
    return httpx.get(f"{proxy.upstream_url}/v2/{image.repository}/blobs/{digest}").content


def _gets(proxy: FaultProxy, digest: str) -> list[tuple[str | None, int, int]]:
    return [(r.range_header, r.status, r.bytes_sent) for r in proxy.requests if r.method == "GET" and digest in r.path]


def test_a_partial_holding_the_whole_blob_is_used_without_a_request(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    """A run killed between a disk layer's last byte and its commit leaves a complete,
    uncommitted partial. The next pull verifies and decodes it as it is: no request for that
    blob at all, so no Range at the blob's end (which a registry answers 416). This is how
    fetch meets "the partial already holds the whole blob": it never asks the server.

    Mutant it catches: ``_Download.attempt`` streaming even when ``offset == size`` (the Range
    ``bytes=<size>-`` goes out; the registry's 416 is then taken by ``_blob_response`` and the
    pull still lands, one needless round trip later)."""
    layer = small_image.disk_layers[1]
    whole = _blob(proxy, small_image, layer["digest"])
    assert len(whole) == layer["size"]
    held = partial(user, layer["digest"])
    held.parent.mkdir(parents=True)
    held.write_bytes(whole)
    result = user.run("pull", "--insecure", ref_of(proxy, small_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert _gets(proxy, layer["digest"]) == []
    assert proxy.blob_bytes_served == fetchable_bytes(small_image) - layer["size"]
    assert not held.exists()  # used up: the decoded layer is what is kept


def test_a_range_answered_416_starts_the_blob_over(user: Tartflow, proxy: FaultProxy, small_image: BuiltImage) -> None:
    """Half a disk layer is kept; the server answers its Range with 416 (a CDN node holding a
    truncated copy says our offset is past the end). The client reads that as "the blob ends
    at your offset"; the size then disagrees with the descriptor, so the kept bytes cannot be
    this blob: they are dropped and the layer is fetched whole, and the pull ends byte-exact.

    Mutant it catches: the ``status == 416`` branch of ``RegistryClient._blob_response``
    removed (the 416 becomes a registry error that is not retried: the pull fails)."""
    layer = small_image.disk_layers[1]
    kept = layer["size"] // 2
    held = partial(user, layer["digest"])
    held.parent.mkdir(parents=True)
    held.write_bytes(_blob(proxy, small_image, layer["digest"])[:kept])
    proxy.override("GET", layer["digest"], 416, {"Content-Range": f"bytes */{kept}", "Content-Length": "0"}, b"", 1)
    result = user.run("pull", "--insecure", ref_of(proxy, small_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert _gets(proxy, layer["digest"]) == [(f"bytes={kept}-", 416, 0), (None, 200, layer["size"])]
    assert proxy.blob_bytes_served == fetchable_bytes(small_image)


def test_reuse_from_a_corrupt_local_vm_falls_back_to_the_network(
    user: Tartflow, proxy: FaultProxy, registry: Registry, small_image: BuiltImage
) -> None:
    """A VM with the same disk layers (another manifest) is in Tart's cache under the
    registry's own name, and one byte of its second disk layer was altered after install. Pulling it through the proxy (another name, so
    another VM) copies the intact layers and config from the local VM and fetches only the
    altered layer from the network; the new VM is byte-exact and the corrupt one untouched.

    Mutants it catches: ``copy_layer`` not verifying the copy (the altered byte lands in the new
    VM); ``reuse_local`` giving up on the first corrupt source by raising (the pull fails);
    ``reuse_local`` never used (every layer crosses the wire)."""
    manifest = small_image.manifest  # the same blobs under another manifest digest: a VM reuse may take from
    manifest["annotations"] = {"org.example.built-by": "another pipeline"}
    other = push_raw_manifest(registry.url, small_image.repository, "same-layers", json.dumps(manifest).encode(),
                              OCI_MANIFEST)
    first = user.run("pull", "--insecure", f"{registry.host}/{small_image.repository}:same-layers")
    assert first.returncode == 0, first.stderr
    local = vm_dir(user, registry.host, small_image.repository, other) / "disk.img"
    altered_at = SMALL_LAYER_SIZE + 4321  # inside the second disk layer
    with open(local, "r+b") as f:
        f.seek(altered_at)
        byte = f.read(1)
        f.seek(altered_at)
        f.write(bytes([byte[0] ^ 0xFF]))
    corrupt = local.read_bytes()
    bad = small_image.disk_layers[1]
    result = user.run("pull", "--insecure", ref_of(proxy, small_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    fetched = {r.path.rsplit("/", 1)[-1] for r in proxy.requests if "/blobs/" in r.path and r.bytes_sent}
    assert fetched == {bad["digest"]}, fetched
    assert proxy.blob_bytes_served == bad["size"]
    assert local.read_bytes() == corrupt  # the source is read, never repaired or removed


def _decoding_from_the_store(user: Tartflow, image: BuiltImage) -> bool:
    """A disk layer is being decoded from its stored blob: its dirty marker is up (or its done
    marker is, while the blob verify decodes from is still in the store)."""
    state = user.store / "staging" / f"{image.manifest_digest.split(':')[1]}.state"
    for i, layer in enumerate(image.disk_layers):
        blob = user.store / "blobs" / "sha256" / layer["digest"].split(":")[1]
        if (state / f"layer-{i}.dirty").exists() or ((state / f"layer-{i}.done").exists() and blob.exists()):
            return True
    return False


def test_kill_while_verify_decodes_from_the_store_then_resume_is_byte_exact(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage
) -> None:
    """Every disk layer is already a committed blob in the store (kept for another image), so
    verify-digest decodes each from there (``disk.decode_layer``). The pull is killed while
    that decode runs (the kill point the seeded kill test's ``decode`` phase never reached);
    the next pull decodes what is left from the same blobs, moves no disk layer over the wire,
    and lands byte-exact.

    Mutant it catches: ``verify`` dropping the stored blob as its decode starts rather than
    once the layer is verified (the kill leaves a half-decoded layer whose blob is gone: the
    resume fetches it again)."""
    ref = ref_of(proxy, medium_image)
    for layer in medium_image.disk_layers:
        blob = user.store / "blobs" / "sha256" / layer["digest"].split(":")[1]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(_blob(proxy, medium_image, layer["digest"]))
    proc = user.start("pull", "--insecure", ref)
    deadline = time.monotonic() + 60
    while proc.poll() is None and not _decoding_from_the_store(user, medium_image) and time.monotonic() < deadline:
        time.sleep(0.001)
    alive = proc.poll() is None
    proc.kill()
    _out, err = proc.communicate(timeout=10)
    assert alive and _decoding_from_the_store(user, medium_image), f"the pull ended before any decode: {err[-2000:]}"
    assert not [r for r in proxy.requests if "/blobs/" in r.path and r.bytes_sent and any(
        lay["digest"] in r.path for lay in medium_image.disk_layers)]
    proxy.reset_counters()
    result = user.run("pull", "--insecure", ref)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, medium_image)
    disk = {lay["digest"] for lay in medium_image.disk_layers}
    assert not [r.path for r in proxy.requests if r.bytes_sent and any(d in r.path for d in disk)]
