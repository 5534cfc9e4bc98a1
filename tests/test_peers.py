"""Runners feeding each other (issue 16): ``tartflow serve`` on one runner, pulls on another that
ask it first. Real processes through the CLI, a real registry behind the counting fault proxy,
separate TART_HOMEs; misbehaving peers are a proxy in front of a real one (support/peerfaults)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tartflow.peer.wire import ZERO_RUNS, ZeroRunDecoder, encode_bytes, encode_file_range
from tests.checks import assert_pulled, fetchable_bytes, vm_dir
from tests.support.cli import Tartflow, command
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage
from tests.support.peerfaults import BadPeer
from tests.support.prefectserver import PrefectServer
from tests.support.registry import Registry, free_port

TOKEN = "peer-token-for-tests-only"


@dataclass
class Peer:
    user: Tartflow
    url: str
    vm: Path  # the digest directory it serves from


@pytest.fixture(scope="module")
def peer_a(tmp_path_factory: pytest.TempPathFactory, registry: Registry, small_image: BuiltImage,
           prefect_server: PrefectServer) -> Iterator[Peer]:
    """Runner A: pulled the small image straight from the registry, serves its cache."""
    root = tmp_path_factory.mktemp("runner-a")
    user = Tartflow(root / "tart", root / "prefect", prefect_server.api_url)
    host = registry.url.removeprefix("http://")
    pulled = user.run("pull", "--insecure", f"{host}/{small_image.repository}:{small_image.tag}")
    assert pulled.returncode == 0, pulled.stderr
    port = free_port()
    server = user.start("serve", "--listen", f"127.0.0.1:{port}", TARTFLOW_PEER_TOKEN=TOKEN)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(url, server)
        yield Peer(user, url, vm_dir(user, host, small_image.repository, small_image.manifest_digest))
    finally:
        server.terminate()
        _, err = server.communicate(timeout=20)
    assert server.returncode == 0, err


def _wait_up(url: str, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[1]
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("tartflow serve never came up")


def _pull_from(user: Tartflow, proxy: FaultProxy, image: BuiltImage, peers: list[str], **env: str):
    """A pull asking ``peers``. The read timeout is 30 s unless a test sets it: on a loaded
    machine a good peer must not count as stalled where a test expects it to serve."""
    ref = f"{proxy.host}/{image.repository}:{image.tag}"
    return user.run("pull", "--insecure", ref, TARTFLOW_PEERS=json.dumps(peers),
                    **{"TARTFLOW_PEER_TOKEN": TOKEN, "TARTFLOW_READ_TIMEOUT": "30", **env})


def _disk_blob_bytes(proxy: FaultProxy, image: BuiltImage) -> int:
    disk = {layer["digest"] for layer in image.disk_layers}
    return sum(r.bytes_sent for r in proxy.requests if r.method == "GET" and r.path.rsplit("/", 1)[-1] in disk)


def test_b_pulls_from_a_and_the_registry_sends_no_blob_bytes(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, peer_a: Peer
) -> None:
    result = _pull_from(user, proxy, small_image, [peer_a.url])
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert proxy.blob_bytes_served == 0, result.stderr  # disk layers, config and NVRAM all came from A
    assert [r for r in proxy.requests if "/manifests/" in r.path], "the manifest must come from the registry"
    disk = (vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest) / "disk.img").stat()
    assert disk.st_blocks * 512 < disk.st_size, "zeros from the peer were written, not left as holes"


def test_without_the_token_a_answers_401(peer_a: Peer, small_image: BuiltImage) -> None:
    layer = small_image.disk_layers[0]["annotations"]["org.cirruslabs.tart.uncompressed-content-digest"]
    path = f"{peer_a.url}/v1/layers/{layer}"
    assert httpx.get(path).status_code == 401
    assert httpx.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(path, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    answer = httpx.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    size = int(small_image.disk_layers[0]["annotations"]["org.cirruslabs.tart.uncompressed-size"])
    assert answer.content == small_image.disk_path.read_bytes()[:size]  # layer 0 starts the disk


def test_range_and_zero_runs_are_the_layers_bytes(peer_a: Peer, small_image: BuiltImage) -> None:
    annotations = small_image.disk_layers[1]["annotations"]
    digest, size = annotations["org.cirruslabs.tart.uncompressed-content-digest"], int(
        annotations["org.cirruslabs.tart.uncompressed-size"])
    offset = int(small_image.disk_layers[0]["annotations"]["org.cirruslabs.tart.uncompressed-size"])
    expected = small_image.disk_path.read_bytes()[offset:offset + size]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    part = httpx.get(f"{peer_a.url}/v1/layers/{digest}", headers={**auth, "Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == expected[1000:]
    assert part.headers["content-range"] == f"bytes 1000-{size - 1}/{size}"
    framed = httpx.get(f"{peer_a.url}/v1/layers/{digest}", headers={**auth, "Accept": ZERO_RUNS})
    decoded = b"".join(bytes(p) for p in ZeroRunDecoder().feed(framed.content))  # bytes(n) is n zeros
    assert decoded == expected
    assert len(framed.content) < len(expected) - expected.count(bytes(65536)) * 65536 + 4096
    bad = httpx.get(f"{peer_a.url}/v1/layers/{digest}", headers={**auth, "Range": f"bytes={size}-"})
    assert bad.status_code == 416


def test_zero_run_encoding_round_trips(tmp_path: Path) -> None:
    data = bytes(200_000) + os.urandom(70_000) + bytes(131_072) + b"x" + bytes(5)
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(10 << 20)
        f.seek(3 << 20)
        f.write(data)
        f.seek(8 << 20)
        f.write(b"data past the range, after a hole")
    fd = os.open(path, os.O_RDONLY)
    try:
        body = b"".join(encode_file_range(fd, 1000, (3 << 20) + len(data) + 7))
    finally:
        os.close(fd)
    pieces = ZeroRunDecoder().feed(body)
    decoded = b"".join(bytes(p) for p in pieces)
    assert decoded == path.read_bytes()[1000:(3 << 20) + len(data) + 7]
    assert len(body) < 200_000  # of 3.5 MB: the 3 MiB hole and the all-zero 64 KiB chunks were not sent
    assert b"".join(bytes(p) for p in ZeroRunDecoder().feed(b"".join(encode_bytes(data)))) == data


@pytest.mark.parametrize("mode", ["garbage", "liar", "stall", "die"])
def test_a_bad_peer_is_skipped_and_the_pull_ends_byte_exact(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, peer_a: Peer, mode: str
) -> None:
    """garbage: well-framed bytes that only the digest check rejects; stall: silence past the
    read timeout (5 s in tests) mid-layer; die: the connection drops mid-layer and the peer is
    gone for good. With no other peer, everything missing comes from the registry."""
    bad = BadPeer(peer_a.url, mode if mode != "die" else "cut", after=300_000, then="die")
    started = time.monotonic()
    with bad:
        result = _pull_from(user, proxy, small_image, [bad.url], TARTFLOW_READ_TIMEOUT="5")
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert bad.paths, "the bad peer was never asked"
    assert mode == "garbage" or bad.ranges, "the bad peer was never asked for a layer"
    assert proxy.blob_bytes_served <= fetchable_bytes(small_image)
    assert _disk_blob_bytes(proxy, small_image) > 0  # the registry filled what the peer did not
    assert time.monotonic() - started < 150


def test_a_cut_is_resumed_by_range_from_the_same_peer(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, peer_a: Peer
) -> None:
    with BadPeer(peer_a.url, "cut", after=300_000, then="pass") as flaky:
        result = _pull_from(user, proxy, small_image, [flaky.url])
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert proxy.blob_bytes_served == 0
    resumed = [r for r in flaky.ranges if r and r != "bytes=0-"]
    assert resumed, f"no request resumed mid-layer: {flaky.ranges}"


def test_garbage_from_one_peer_then_a_good_one_serves_everything(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, peer_a: Peer
) -> None:
    with BadPeer(peer_a.url, "garbage") as liar:
        result = _pull_from(user, proxy, small_image, [liar.url, peer_a.url])
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    # The liar was asked first. Which blob it was asked for depends on which fetch starts first:
    # once it has lied about one, it rests for the rest of the pull (COOLDOWN), so it may never
    # see a layer request.
    assert liar.paths and proxy.blob_bytes_served == 0


def _raw_get(url: str, path: str) -> int:
    """A request line sent as written: no client normalises ``..`` away."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.endheaders()
        answer = conn.getresponse()
        answer.read()
        return answer.status
    finally:
        conn.close()


def _foreign_vm(peer: Peer, small_image: BuiltImage, where: Path, secret: bytes) -> tuple[Path, str]:
    """A complete VM at ``where`` whose NVRAM is ``secret``; returns it and the secret's digest."""
    shutil.copytree(peer.vm, where)
    (where / "nvram.bin").write_bytes(secret)
    digest = "sha256:" + hashlib.sha256(secret).hexdigest()
    manifest = small_image.manifest
    for layer in manifest["layers"]:
        if layer["mediaType"].endswith("nvram.v1"):
            layer.update(digest=digest, size=len(secret))
    raw = json.dumps(manifest).encode()
    (where / "manifest.json").write_bytes(raw)
    final = where.with_name("sha256:" + hashlib.sha256(raw).hexdigest())
    where.rename(final)
    return final, digest


def test_nothing_outside_a_complete_cached_vm_is_reachable(
    peer_a: Peer, small_image: BuiltImage, tmp_path: Path
) -> None:
    passwd = "sha256:" + hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    for path in ("/v1/layers/../../../../etc/passwd", "/v1/blobs/..%2F..%2F..%2Fetc%2Fpasswd",
                 "/v1/blobs/%2Fetc%2Fpasswd", f"/v1/blobs/{passwd}", "/v1/layers/sha256:..",
                 "/v1/blobs/sha256:" + "0" * 64 + "/../../config.json", "/../../etc/passwd"):
        assert _raw_get(peer_a.url, path) == 404, path
    oci = peer_a.user.oci
    # A VM outside the cache, reached through a symlinked digest directory, a symlinked
    # namespace directory, or a symlinked nvram.bin in a real digest directory: never served.
    outside, digest = _foreign_vm(peer_a, small_image, tmp_path / "sha256:x", b"secret nvram " * 100)
    linked_vm = oci / "evil.example" / "ns"
    linked_vm.mkdir(parents=True)
    (linked_vm / outside.name).symlink_to(outside)
    (oci / "evil2.example").symlink_to(outside.parent)
    real = oci / "evil3.example" / "ns" / outside.name
    shutil.copytree(outside, real)
    (real / "nvram.bin").unlink()
    (real / "nvram.bin").symlink_to(outside / "nvram.bin")
    time.sleep(1.1)  # past the index's rescan interval
    try:
        assert _raw_get(peer_a.url, f"/v1/blobs/{digest}") == 404
        # The control: the same VM copied into the cache as a real directory is served.
        (real / "nvram.bin").unlink()
        shutil.copy(outside / "nvram.bin", real / "nvram.bin")
        time.sleep(1.1)
        assert _raw_get(peer_a.url, f"/v1/blobs/{digest}") == 200
    finally:
        for path in (oci / "evil.example", oci / "evil3.example"):
            shutil.rmtree(path)
        (oci / "evil2.example").unlink()


def test_with_a_wrong_token_the_pull_falls_back_to_the_registry(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, peer_a: Peer
) -> None:
    result = _pull_from(user, proxy, small_image, [peer_a.url], TARTFLOW_PEER_TOKEN="not-the-fleets-token")
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert proxy.blob_bytes_served == fetchable_bytes(small_image)
    assert "not-the-fleets-token" not in result.stderr + result.stdout


def test_a_cached_layer_that_does_not_hash_right_is_never_served(
    peer_a: Peer, small_image: BuiltImage, tmp_path: Path
) -> None:
    """A VM in the cache whose disk.img was damaged after the pull: its other layers are served,
    the damaged one is not (the receiver would reject it too, but a peer does not send it)."""
    home = tmp_path / "tart"
    copy = home / "cache" / "OCIs" / "example.com" / "ns" / peer_a.vm.name
    shutil.copytree(peer_a.vm, copy)
    size0 = int(small_image.disk_layers[0]["annotations"]["org.cirruslabs.tart.uncompressed-size"])
    with open(copy / "disk.img", "r+b") as f:
        f.seek(size0 + 4096)
        byte = f.read(1)
        f.seek(size0 + 4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    port = free_port()
    user = Tartflow(home, tmp_path / "prefect", None)
    server = user.start("serve", "--listen", f"127.0.0.1:{port}", TARTFLOW_PEER_TOKEN=TOKEN)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(url, server)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        digests = [layer["annotations"]["org.cirruslabs.tart.uncompressed-content-digest"]
                   for layer in small_image.disk_layers]
        assert httpx.get(f"{url}/v1/layers/{digests[1]}", headers=auth).status_code == 404
        whole = httpx.get(f"{url}/v1/layers/{digests[0]}", headers=auth)
        assert whole.status_code == 200 and whole.content == small_image.disk_path.read_bytes()[:size0]
    finally:
        server.terminate()
        server.communicate(timeout=20)


def test_the_token_can_come_from_a_prefect_secret_block(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, peer_a: Peer
) -> None:
    """Deployments keep the token in the Secret block ``tartflow-peer-token``; the environment
    wins when it has one. The block is removed again: the session's server is shared."""
    save = "import sys\nfrom prefect.blocks.system import Secret\nSecret(value=sys.argv[1]).save('tartflow-peer-token')\n"
    drop = "from prefect.blocks.system import Secret\nSecret.delete('tartflow-peer-token')\n"
    subprocess.run([sys.executable, "-c", save, TOKEN], env=user.env(), check=True, capture_output=True, timeout=60)
    try:
        env = user.env()
        env.pop("TARTFLOW_PEER_TOKEN", None)
        ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
        result = subprocess.run([*command(), "pull", "--insecure", ref], capture_output=True, text=True, timeout=180,
                                env={**env, "TARTFLOW_PEERS": json.dumps([peer_a.url]), "TARTFLOW_READ_TIMEOUT": "30"},
                                stdin=subprocess.DEVNULL)
    finally:
        subprocess.run([sys.executable, "-c", drop], env=user.env(), check=True, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert proxy.blob_bytes_served == 0, result.stderr
    assert TOKEN not in result.stderr + result.stdout
