"""What networks and people do to a 50 GB pull, at small scale: every fault injected by our proxy
in front of the real registry, every outcome checked on the bytes the proxy served and the
bytes that landed in Tart's cache."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import filelock
import pytest

from tests.checks import assert_pulled, done_layers, fetchable_bytes, resumable, wait_for
from tests.conftest import SMALL_BLOCK_SIZES, _small_stored
from tests.support.cli import Tartflow
from tests.support.faultproxy import AUTH_FAILED_BODY, FaultProxy
from tests.support.imagebuilder import BuiltImage, build_and_push


def ref_of(proxy: FaultProxy, image: BuiltImage) -> str:
    return f"{proxy.host}/{image.repository}:{image.tag}"


def test_egress_503s_at_29_46_53_69_percent_finish_in_one_invocation(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage
) -> None:
    total = fetchable_bytes(medium_image)
    proxy.throttle(1_500_000)  # keep several streams in flight when each egress limit hits
    proxy.egress_503_at([int(total * p) for p in (0.29, 0.46, 0.53, 0.69)], burst=3)
    proxy.cut_after(50_000, count=2)
    result = user.run("pull", "--insecure", ref_of(proxy, medium_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, medium_image)
    assert proxy.blob_bytes_served <= total * 1.10
    assert sum(1 for r in proxy.requests if r.status == 503) >= 4 * 3
    assert "ServerBusy" in result.stderr and "retrying in" in result.stderr  # the wait is visible


def test_429_with_retry_after_and_5xx_are_retried(user: Tartflow, proxy: FaultProxy, small_image: BuiltImage) -> None:
    """429s carry Retry-After in both forms, an HTTP date 3 s after the answer and 2 s; the retry
    of each blob comes no sooner than it says (measured between the proxy's own arrivals; the
    date has whole seconds, so it leaves at least 2 s).

    Mutant it catches: ``RetryPolicy.delay`` ignoring ``retry_after`` (its jittered backoff
    starts below 1 s), or ``parse_retry_after`` returning None for either form."""
    proxy.status_burst(429, 1, retry_after=3.0)
    proxy.status_burst(429, 1, retry_after="2")
    for status in (500, 502, 504):
        proxy.status_burst(status, 1)
    result = user.run("pull", "--insecure", ref_of(proxy, small_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    requests, arrivals = proxy.requests, proxy.arrivals
    statuses = [r.status for r in requests]
    assert statuses.count(429) == 2 and {500, 502, 504} <= set(statuses)
    assert "TOOMANYREQUESTS" in result.stderr
    waits = []
    for i, first in enumerate(requests):
        if first.status == 429:
            again = next(j for j in range(i + 1, len(requests)) if requests[j].path == first.path)
            waits.append(arrivals[again] - arrivals[i])
    assert waits[0] >= 1.9 and waits[1] >= 1.9, waits  # Retry-After was honoured, not ignored
    assert proxy.blob_bytes_served == fetchable_bytes(small_image)


def test_cut_stalled_and_short_streams_resume_with_ranges(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    proxy.cut_after(300_000, count=1)
    proxy.stall_after(200_000, seconds=30, count=1)
    proxy.short_content_length(count=1)
    result = user.run("pull", "--insecure", ref_of(proxy, small_image), TARTFLOW_READ_TIMEOUT="2")
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert any(r.range_header for r in proxy.requests)  # resumed, not restarted
    assert proxy.blob_bytes_served == fetchable_bytes(small_image)


def test_flipped_byte_is_caught_and_refetched(user: Tartflow, proxy: FaultProxy, small_image: BuiltImage) -> None:
    layer = small_image.disk_layers[1]
    proxy.flip_byte(layer["digest"], offset=layer["size"] // 2)
    result = user.run("pull", "--insecure", ref_of(proxy, small_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert proxy.blob_bytes_served == fetchable_bytes(small_image) + layer["size"]


@pytest.mark.task_failures(r"DigestMismatchError: .*failed verification 3 times")
def test_corrupt_blob_on_every_attempt_fails_with_one_line(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    layer = small_image.disk_layers[0]
    proxy.flip_byte(layer["digest"], offset=10, count=100)
    result = user.run("pull", "--insecure", ref_of(proxy, small_image))
    assert result.returncode == 1
    assert "failed verification 3 times" in result.stderr and "Traceback" not in result.stderr
    assert not (user.oci / proxy.host.replace(":", "%3A")).exists() or not any(
        p.name == "v1" for p in user.oci.rglob("v1")
    )


def test_expired_cdn_redirect_goes_back_to_the_registry(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    """A disk layer's CDN stream stalls past its signature's 1 s life, and the redirect the
    registry hands out next has expired in transit (the CDN answers 403 AuthenticationFailed);
    each new attempt asks the registry for a fresh redirect, and no signed query is ever shown.

    Mutants it catches: ``open_blob`` going back to the last CDN URL instead of the registry
    (the retry after the stall gets the proxy's real 403 for an expired signature, every time);
    ``error_from_response`` treating a CDN 403 as permanent (the pull fails); ``redact`` keeping
    the query string (``sig=`` appears in stderr)."""
    layer = small_image.disk_layers[0]
    digest = layer["digest"]
    proxy.cdn_redirects(ttl=1.0)
    proxy.stall_after(100_000, seconds=30, digest=digest)  # the disk layer, not the small config
    proxy.expire_grants(digest, after=1)  # the first redirect is good, the second expired
    result = user.run("pull", "--insecure", ref_of(proxy, small_image), TARTFLOW_READ_TIMEOUT="2")
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    gets = [r for r in proxy.requests if r.method == "GET" and digest in r.path]
    steps = ["cdn" if r.path.startswith("/cdn/") else r.status for r in gets]
    assert steps == [307, "cdn", 307, "cdn", 307, "cdn"], gets  # a fresh redirect before each CDN GET
    stalled, expired, finished = (r for r in gets if r.path.startswith("/cdn/"))
    assert stalled.status in (200, 206) and stalled.bytes_sent == 100_000  # the stall happened
    assert expired.status == 403 and expired.bytes_sent == len(AUTH_FAILED_BODY)
    assert finished.status in (200, 206) and stalled.bytes_sent + finished.bytes_sent >= layer["size"]
    signatures = {parse_qs(urlsplit(r.path).query)["sig"][0] for r in (stalled, expired, finished)}
    assert len(signatures) == 3  # no signed URL was used twice
    assert "/cdn/" in result.stderr and "AuthenticationFailed" in result.stderr  # the URL was shown...
    assert "sig=" not in result.stderr and "se=" not in result.stderr  # ...without its query


@pytest.mark.task_failures(r"InterruptedPull: pull interrupted")
@pytest.mark.parametrize(("sig", "at"), [(signal.SIGINT, 0.40), (signal.SIGTERM, 0.55)])
def test_signal_then_second_invocation_moves_at_most_110_percent(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage, sig: signal.Signals, at: float
) -> None:
    total = fetchable_bytes(medium_image)
    proxy.throttle(1_000_000)
    proc = user.start("pull", "--insecure", ref_of(proxy, medium_image))
    wait_for(lambda: proxy.blob_bytes_served >= total * at, 60, proc)
    started = time.monotonic()
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("tartflow: ") and "run the same command again" in err
    assert "Traceback" not in err
    proxy.clear_faults()
    result = user.run("pull", "--insecure", ref_of(proxy, medium_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, medium_image)
    assert proxy.blob_bytes_served <= total * 1.10


def test_kill_9_at_60_percent_then_second_invocation_moves_at_most_115_percent(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage
) -> None:
    total = fetchable_bytes(medium_image)
    proxy.throttle(1_000_000)
    proc = user.start("pull", "--insecure", ref_of(proxy, medium_image))
    wait_for(lambda: proxy.blob_bytes_served >= total * 0.60, 60, proc)
    proc.kill()
    proc.communicate(timeout=10)
    proxy.clear_faults()
    result = user.run("pull", "--insecure", ref_of(proxy, medium_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, medium_image)
    assert proxy.blob_bytes_served <= total * 1.15


def test_two_pulls_of_one_image_at_once_fetch_each_blob_once(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage
) -> None:
    proxy.throttle(2_000_000)
    procs = [user.start("pull", "--insecure", ref_of(proxy, medium_image)) for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert_pulled(user, proxy.host, medium_image)
    assert proxy.blob_bytes_served == fetchable_bytes(medium_image)
    served = [r.path for r in proxy.requests if "/blobs/" in r.path and r.status in (200, 206)]
    assert len(served) == len(set(served))


def _variant(registry, image: BuiltImage, tmp_path: Path, tag: str) -> tuple[BuiltImage, set[str]]:
    """``image`` with its last disk layer changed, pushed as ``tag``; and the shared layers."""
    disk = tmp_path / "disk.img"
    shutil.copyfile(image.disk_path, disk)
    with open(disk, "r+b") as f:  # change the last layer only
        f.seek(-1000, os.SEEK_END)
        f.write(os.urandom(1000))
    other = build_and_push(registry.url, "acme/medium", tag, disk, layer_size=2 * 1024 * 1024,
                           block_sizes=SMALL_BLOCK_SIZES, stored=_small_stored)
    shared = {lay["digest"] for lay in other.disk_layers} & {lay["digest"] for lay in image.disk_layers}
    assert len(shared) >= len(other.disk_layers) - 1
    return other, shared


def test_layers_finished_by_an_interrupted_pull_serve_a_pull_of_another_image(
    user: Tartflow, proxy: FaultProxy, registry, medium_image: BuiltImage, tmp_path: Path
) -> None:
    other, shared = _variant(registry, medium_image, tmp_path, "v3")
    proxy.throttle(2_000_000)
    proc = user.start("pull", "--insecure", ref_of(proxy, medium_image), "--concurrency", "1")
    wait_for(lambda: len(done_layers(user, medium_image)) >= 3, 60, proc)
    proc.kill()
    proc.communicate(timeout=10)
    done = {medium_image.disk_layers[i]["digest"] for i in done_layers(user, medium_image)}
    done &= shared
    assert done
    proxy.clear_faults()
    proxy.reset_counters()
    result = user.run("pull", "--insecure", ref_of(proxy, other))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, other)
    fetched = {r.path.rsplit("/", 1)[-1] for r in proxy.requests if "/blobs/" in r.path}
    assert not fetched & done  # copied from the interrupted pull's staging VM, verified
    assert proxy.blob_bytes_served <= fetchable_bytes(other) - sum(
        lay["size"] for lay in other.disk_layers if lay["digest"] in done)


def test_images_sharing_layers_share_the_download(
    user: Tartflow, proxy: FaultProxy, registry, medium_image: BuiltImage, tmp_path: Path
) -> None:
    other, shared = _variant(registry, medium_image, tmp_path, "v2")
    proxy.throttle(2_000_000)
    procs = [user.start("pull", "--insecure", ref_of(proxy, image)) for image in (medium_image, other)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert_pulled(user, proxy.host, medium_image)
    assert_pulled(user, proxy.host, other)
    served = [r.path.rsplit("/", 1)[-1] for r in proxy.requests if "/blobs/" in r.path and r.status in (200, 206)]
    twice = {d[:19]: served.count(d) for d in shared if served.count(d) != 1}
    assert not twice, (twice, results)


def test_gc_removes_abandoned_partials_but_not_locked_ones(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage
) -> None:
    proxy.throttle(500_000)
    proc = user.start("pull", "--insecure", ref_of(proxy, medium_image))
    wait_for(lambda: _resumable_bytes(user, medium_image) > 0, 60, proc)
    proc.kill()
    proc.communicate(timeout=10)
    partials = sorted(user.store.glob("ingest/sha256/*"))
    assert partials
    held = filelock.FileLock(user.store / "locks" / "blobs" / f"{partials[0].name}.lock")
    held.acquire()
    try:
        result = user.run("gc", "--older-than", "0")
    finally:
        held.release()
    assert result.returncode == 0, result.stderr
    assert partials[0].exists() and "a pull is using it" in result.stdout
    assert all(not p.exists() for p in partials[1:])
    assert "freed" in result.stdout.splitlines()[-1]
    young = user.run("gc")  # the default age keeps what is recent
    assert young.returncode == 0 and partials[0].exists()


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 48 MiB tmpfs (skipped where this user cannot mount, e.g. macOS without root)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.task_failures(r"InsufficientSpaceError: not enough disk space")
def test_not_enough_space_is_refused_before_fetching(
    small_fs: Path, tmp_path: Path, proxy: FaultProxy, medium_image: BuiltImage, prefect_server
) -> None:
    user = Tartflow(small_fs / "tart", tmp_path / "prefect", prefect_server.api_url)
    result = user.run("pull", "--insecure", ref_of(proxy, medium_image))
    assert result.returncode == 1
    assert "not enough disk space" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert proxy.blob_bytes_served == 0


@pytest.mark.task_failures(r"InsufficientSpaceError: out of disk space")
def test_disk_full_mid_pull_keeps_what_was_fetched(
    small_fs: Path, tmp_path: Path, proxy: FaultProxy, medium_image: BuiltImage, prefect_server
) -> None:
    """Another program fills the disk mid-pull: the pull fails with one line, keeps at least a
    quarter of the bytes, and the next pull moves only the rest. Task runs may fail only with
    the out-of-space error (read back from Prefect by conftest's check).

    Mutant it catches: ``AppleLZ4Decoder.feed`` resizing its buffer in place when the sink fails
    (the task runs whose ENOSPC hit a block completed in the buffer end in ``BufferError``)."""
    user = Tartflow(small_fs / "tart", tmp_path / "prefect", prefect_server.api_url)
    total = fetchable_bytes(medium_image)
    filler = small_fs / "filler"
    proxy.throttle(1_000_000)
    proc = user.start("pull", "--insecure", ref_of(proxy, medium_image), TARTFLOW_SPACE_MARGIN="0")
    wait_for(lambda: proxy.blob_bytes_served >= total * 0.3, 60, proc)

    def fill() -> None:  # another program eats the disk while the pull runs
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"x" * 65536)
            except OSError:
                pass

    threading.Thread(target=fill).start()
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "out of disk space" in err.strip().splitlines()[-1] and "Traceback" not in err
    kept = _kept_bytes(user, medium_image)
    assert kept >= total * 0.25
    filler.unlink()
    proxy.clear_faults()
    served_before = proxy.blob_bytes_served
    result = user.run("pull", "--insecure", ref_of(proxy, medium_image), TARTFLOW_SPACE_MARGIN="0")
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, medium_image)
    assert proxy.blob_bytes_served - served_before <= total - kept + total * 0.1


def _resumable_bytes(user: Tartflow, image: BuiltImage) -> int:
    """Compressed bytes a next run resumes from: partials, and checkpoints of layers decoded
    on the way in."""
    return sum(resumable(user, image, digest) for digest in {d["digest"] for d in image.disk_layers})


def _kept_bytes(user: Tartflow, image: BuiltImage) -> int:
    """Compressed bytes a pull has kept: partials, checkpoints and blobs in the store, plus the
    blobs of layers already decoded into the staging VM (their decoded form is what is kept)."""
    blobs = sum(p.stat().st_size for p in user.store.glob("blobs/sha256/*"))
    stored = blobs + _resumable_bytes(user, image)
    decoded = {image.disk_layers[i]["digest"]: image.disk_layers[i]["size"] for i in done_layers(user, image)}
    on_disk = {p.parent.name if p.name == "data" else p.name for p in user.store.rglob("*") if p.is_file()}
    return stored + sum(size for digest, size in decoded.items() if digest.split(":")[1] not in on_disk)


def _phase_reached(user: Tartflow, image: BuiltImage, phase: str, rng: random.Random) -> Callable[[], bool]:
    state = user.store / "staging" / f"{image.manifest_digest.split(':')[1]}.state"
    layers = len(image.disk_layers)
    if phase == "fetch":
        target = rng.uniform(0.05, 0.9) * sum(layer["size"] for layer in image.disk_layers)
        return lambda: _resumable_bytes(user, image) >= target
    if phase == "decode-on-arrival":  # a layer being decoded as its bytes arrive (the download is on)
        return lambda: any(state.glob("layer-*.dirty"))
    return lambda: len(list(state.glob("layer-*.done"))) == layers  # every layer verified: assembly is next


@pytest.mark.parametrize("seed", range(6))
def test_seeded_kill_points_always_end_byte_exact(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, seed: int
) -> None:
    rng = random.Random(seed)
    """A kill while bytes arrive (``fetch``), while a layer is half decoded from the wire
    (``decode-on-arrival``; a kill in the decode from the store is
    ``test_kill_while_verify_decodes_from_the_store_then_resume_is_byte_exact``) or once every
    layer is verified (``assembly``); the next pull ends byte-exact with nothing left in staging."""
    phase = ("fetch", "decode-on-arrival", "assembly")[seed % 3]
    ref = ref_of(proxy, small_image)
    proxy.throttle(3_000_000 if phase == "fetch" else None)
    proc = user.start("pull", "--insecure", ref)
    reached = _phase_reached(user, small_image, phase, rng)
    deadline = time.monotonic() + 60
    while proc.poll() is None and not reached() and time.monotonic() < deadline:
        time.sleep(0.001)
    alive = proc.poll() is None
    proc.kill()
    proc.communicate(timeout=10)
    assert alive and reached(), f"the pull ended before the {phase} kill point"
    proxy.clear_faults()
    result = user.run("pull", "--insecure", ref)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    leftovers = [p for p in user.store.rglob("*") if p.is_file() and "staging" in p.parts]
    assert leftovers == []
