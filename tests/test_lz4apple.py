"""Apple's framed LZ4: round trips, the window across blocks, and every kind of corrupt stream."""

from __future__ import annotations

import random
import struct
import tracemalloc

import lz4.block
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tartflow import lz4apple
from tartflow.errors import CorruptLayerError
from tartflow.lz4apple import WINDOW, AppleLZ4Decoder, encode, encode_bytes

# The decoder_path fixture below is the same for every example of a property test.
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

NATIVE = lz4apple._native()


@pytest.fixture(params=["native", "python-lz4"])
def decoder_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with liblz4 called directly (what pulls use) and with python-lz4's
    ``decompress`` (the fallback where the direct call is unavailable). Only tests that decode
    LZ4 blocks take both (``@both``): header checks, size limits and the encoder take the same
    path either way and run once, on the native one."""
    if request.param == "python-lz4":
        monkeypatch.setattr(lz4apple, "_native", lambda: None)
    return str(request.param)


both = pytest.mark.usefixtures("decoder_path")


def test_liblz4_is_called_directly_here() -> None:
    """Found in python-lz4's extension and passing its self-test: else pulls decode slower."""
    assert NATIVE is not None


# -- helpers: an independent, by-the-spec view of the format ----------------------------------


def _ext(n: int) -> bytes:
    """LZ4 length extension bytes for n (the part beyond the token's 15)."""
    return b"\xff" * (n // 255) + bytes((n % 255,))


def _sequence(literals: bytes, offset: int | None = None, match: int = 0) -> bytes:
    """One LZ4 sequence; without an offset it is the last, literals-only sequence."""
    lit, ml = len(literals), match - 4 if offset is not None else 0
    token = (min(lit, 15) << 4) | min(ml, 15)
    out = bytes((token,)) + (_ext(lit - 15) if lit >= 15 else b"") + literals
    if offset is None:
        return out
    return out + struct.pack("<H", offset) + (_ext(ml - 15) if ml >= 15 else b"")


def _compressed(decoded_size: int, block: bytes) -> bytes:
    return b"bv41" + struct.pack("<II", decoded_size, len(block)) + block


def _stored(raw: bytes) -> bytes:
    return b"bv4-" + struct.pack("<I", len(raw)) + raw


def _blocks(frame: bytes) -> list[tuple[bytes, int, bytes, int]]:
    """(magic, decoded size, body, body's offset in the frame) of every block before the end."""
    out, i = [], 0
    while frame[i : i + 4] != b"bv4$":
        magic = frame[i : i + 4]
        if magic == b"bv41":
            dsize, esize = struct.unpack_from("<II", frame, i + 4)
            out.append((magic, dsize, frame[i + 12 : i + 12 + esize], i + 12))
            i += 12 + esize
        else:
            assert magic == b"bv4-"
            (size,) = struct.unpack_from("<I", frame, i + 4)
            out.append((magic, size, frame[i + 8 : i + 8 + size], i + 8))
            i += 8 + size
    assert i + 4 == len(frame)
    return out


def _decode(
    frame: bytes, expected: int, rng: random.Random | None = None, kind: type = bytes
) -> bytes:
    """Decode ``frame`` fed in random pieces (of type ``kind``), then finish."""
    rng = rng or random.Random(0)
    dec, out, i = AppleLZ4Decoder(expected), [], 0
    while i < len(frame):
        n = rng.choice([1, 2, 3, 11, 12, 13, 1000, 65536, 300_000])
        out += dec.feed(kind(frame[i : i + n]))
        i += n
        assert dec.decoded == sum(map(len, out)) <= expected
    dec.finish()
    assert dec.done
    return b"".join(out)


def _mixed(rng: random.Random, size: int) -> bytes:
    """Random, text-like and zero runs of random lengths, like a disk image."""
    parts, total = [], 0
    while total < size:
        n = rng.randrange(1, 150_000)
        kind = rng.randrange(3)
        if kind == 0:
            parts.append(rng.randbytes(n))
        elif kind == 1:
            parts.append(bytes(n))
        else:
            parts.append((b"tart disk %d " % rng.randrange(1000) * n)[:n])
        total += n
    return b"".join(parts)[:size]


def _corrupt(frame: bytes, expected: int, *, chunk: int = 7) -> CorruptLayerError:
    dec = AppleLZ4Decoder(expected)
    with pytest.raises(CorruptLayerError) as info:
        for i in range(0, len(frame), chunk):
            dec.feed(frame[i : i + chunk])
            assert dec.decoded <= expected
        dec.finish()
    message = str(info.value)
    assert message.startswith("disk layer is corrupt: ") and "\n" not in message
    with pytest.raises(CorruptLayerError):  # a failed decoder stays failed
        dec.feed(b"")
    return info.value


# -- round trips -------------------------------------------------------------------------------


@both
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_round_trip_mixed_data_uneven_and_stored_blocks(seed: int, kind: type) -> None:
    rng = random.Random(seed)
    data = _mixed(rng, 700_000)
    sizes = [70_001, 1, 4096, 131_072, 333, 65_536]
    frame = encode_bytes(data, block_sizes=sizes, stored=lambda i: i % 4 == 1)
    magics = {block[0] for block in _blocks(frame)}
    assert magics == {b"bv41", b"bv4-"}
    assert _decode(frame, len(data), rng, kind) == data


@both
@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_sink_gets_every_block_as_it_is_decoded(kind: type) -> None:
    rng = random.Random(7)
    data = _mixed(rng, 900_000)
    frame = encode_bytes(data, block_sizes=[65_536, 100_003, 7], stored=lambda i: i % 3 == 2)
    dec, got = AppleLZ4Decoder(len(data)), []
    for i in range(0, len(frame), 250_000):  # pieces holding many blocks, cut inside others
        assert dec.feed(kind(frame[i : i + 250_000]), lambda piece: got.append(bytes(piece))) == []
        assert dec.decoded == sum(map(len, got))
    dec.finish()
    assert b"".join(got) == data
    assert max(map(len, got)) <= 100_003  # one block at a time, never a feed's worth


@both
@pytest.mark.parametrize("seed", range(6))
def test_a_decoder_resumed_from_a_snapshot_goes_on_exactly(seed: int) -> None:
    """Cut anywhere (inside a header, a compressed block, a stored block), a snapshot plus the
    last 64 KiB of output is all a new decoder needs: matches into earlier blocks still work."""
    rng = random.Random(seed)
    data = _mixed(rng, 600_000)
    frame = encode_bytes(data, block_sizes=[70_001, 3, 65_536, 20_000], stored=lambda i: i % 3 == 1)
    cut = rng.randrange(1, len(frame))
    first, out = AppleLZ4Decoder(len(data)), bytearray()
    for i in range(0, cut, 9_000):
        first.feed(frame[i : min(i + 9_000, cut)], lambda piece: out.extend(piece))
    state = first.snapshot()
    assert state.received == cut and state.decoded == len(out)
    window = bytes(out[-WINDOW:])
    resumed = AppleLZ4Decoder.resumed(len(data), state, window, out.extend)
    for i in range(state.received, len(frame), 50_000):
        resumed.feed(frame[i : i + 50_000], lambda piece: out.extend(piece))
    resumed.finish()
    assert bytes(out) == data
    with pytest.raises(ValueError):  # a window that does not fit the state
        AppleLZ4Decoder.resumed(len(data), state, window[1:] if window else b"x", out.extend)


@both
@pytest.mark.parametrize("seed", range(6))
def test_a_sink_that_fails_leaves_a_state_to_resume_from(seed: int) -> None:
    """A full disk fails the sink on some block: the decoder keeps that block and the rest of
    the input as pending, so a snapshot taken then resumes to exactly the same output."""
    rng = random.Random(seed)
    data = _mixed(rng, 500_000)
    frame = encode_bytes(data, block_sizes=[40_000, 9, 65_536, 30_001], stored=lambda i: i % 3 == 1)
    pieces: list[int] = []
    AppleLZ4Decoder(len(data)).feed(frame, lambda piece: pieces.append(len(piece)))
    # Anywhere, or on the very last block: then the stream has nothing left to add after resuming.
    last = seed % 2 == 0
    fail_at, calls, out = (len(pieces) if last else rng.randrange(2, 20)), [0], bytearray()

    def sink(piece) -> None:
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError(28, "No space left on device")
        out.extend(piece)

    dec, fed = AppleLZ4Decoder(len(data)), 0
    with pytest.raises(OSError):
        while fed < len(frame):
            step = len(frame) if last else rng.choice([7, 5_000, 70_000])
            dec.feed(frame[fed : fed + step], sink)
            fed += step
    fed = min(fed + step, len(frame))  # the piece that failed was received too
    state = dec.snapshot()
    assert state.received == fed and state.decoded == len(out)
    assert fed == len(frame) or not last
    resumed = AppleLZ4Decoder.resumed(len(data), state, bytes(out[-WINDOW:]), out.extend)
    resumed.feed(frame[fed:], out.extend)
    resumed.finish()
    assert bytes(out) == data


@both
def test_a_sink_that_fails_on_a_block_completed_from_the_buffer_raises_its_own_error() -> None:
    """A compressed block cut between two feeds is completed in the decoder's buffer; the sink
    fails on it (a full disk). The caller must see that OSError, not a BufferError from
    resizing a buffer the failed block's views still pin (what the disk-full pull's task runs
    ended in), and the decoder must still resume exactly.

    Mutant it catches: the failure path resizing ``_buf`` in place (``del self._buf[:parsed]``;
    ``self._buf += ...``) instead of building a new buffer."""
    data = (b"tart disk block " * 20_000)[:200_000]
    frame = encode_bytes(data, block_sizes=[50_000])
    assert frame[:4] == b"bv41"  # compressed blocks: decoded from a view of the buffer
    out = bytearray()
    dec = AppleLZ4Decoder(len(data))
    dec.feed(frame[:20], out.extend)  # a header and the start of the first block wait in the buffer

    def full(piece) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as failed:
        dec.feed(frame[20:], full)
    assert failed.type is OSError and failed.value.errno == 28
    state = dec.snapshot()
    assert state.received == len(frame) and state.decoded == 0
    resumed = AppleLZ4Decoder.resumed(len(data), state, b"", out.extend)
    resumed.finish()
    assert bytes(out) == data


@both
def test_one_byte_at_a_time() -> None:
    data = _mixed(random.Random(7), 40_000)
    frame = encode_bytes(data, block_sizes=[5000, 17, 9000], stored=lambda i: i % 3 == 2)
    dec, out = AppleLZ4Decoder(len(data)), []
    for i in range(len(frame)):
        out += dec.feed(frame[i : i + 1])
    dec.finish()
    assert b"".join(out) == data


@both
@FUZZ
@given(
    parts=st.lists(st.tuples(st.binary(min_size=1, max_size=200), st.integers(1, 300)), max_size=6),
    sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=4),
    stored=st.sets(st.integers(0, 40)),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(
    parts: list[tuple[bytes, int]], sizes: list[int], stored: set[int], seed: int
) -> None:
    data = b"".join(part * times for part, times in parts)
    frame = encode_bytes(data, block_sizes=sizes, stored=stored.__contains__)
    assert _decode(frame, len(data), random.Random(seed)) == data


def test_empty_stream_and_encode_pieces() -> None:
    assert list(encode(b"")) == [b"bv4$"]
    assert _decode(b"bv4$", 0) == b""
    pieces = list(encode(bytes(10_000), block_size=4096))
    assert len(pieces) == 4 and pieces[-1] == b"bv4$"


@both
def test_chunks_survive_reuse_of_a_mutable_input_buffer() -> None:
    data = _mixed(random.Random(3), 300_000)
    frame = encode_bytes(data, block_size=50_000, stored=lambda i: i % 2 == 0)
    dec, out, buf = AppleLZ4Decoder(len(data)), [], bytearray(8192)
    for i in range(0, len(frame), len(buf)):
        piece = frame[i : i + len(buf)]
        buf[: len(piece)] = piece  # like readinto() into one reused buffer
        out += dec.feed(memoryview(buf)[: len(piece)])
    buf[:] = bytes(len(buf))
    dec.finish()
    assert b"".join(out) == data


# -- the window runs across blocks -------------------------------------------------------------


@both
@pytest.mark.parametrize("first_kind", ["stored", "compressed"])
@pytest.mark.parametrize("first_size", [4, 40, 70_000])
@pytest.mark.parametrize("lead", [0, 11, 14, 15, 600])
def test_block_made_of_a_match_into_the_previous_block(
    first_kind: str, first_size: int, lead: int
) -> None:
    first = bytes((i * 7 + 1) % 251 for i in range(first_size))
    head = bytes(range(100, 100 + 15)) * 40
    literals, tail = head[:lead], b"VWXYZ"
    offset = min(first_size, 65_535 - lead) + lead  # back into the first block's output
    # `lead` literals, a 32-byte match into the previous block, then the 5 final literals the
    # LZ4 block format requires (the last match starts >= 12 bytes before the end).
    second = _sequence(literals, offset, 32) + _sequence(tail)
    expected = bytearray(first + literals)
    for _ in range(32):
        expected.append(expected[-offset])
    expected += tail
    size = len(expected) - first_size
    with pytest.raises(lz4.block.LZ4BlockError):  # a per-block decoder cannot do it
        lz4.block.decompress(second, uncompressed_size=size)
    block1 = _stored(first) if first_kind == "stored" else _compressed(first_size, _sequence(first))
    frame = block1 + _compressed(size, second) + b"bv4$"
    assert _decode(frame, len(expected)) == bytes(expected)


def test_encode_makes_blocks_that_reference_earlier_blocks() -> None:
    pattern = random.Random(5).randbytes(60_000)  # repeats within LZ4's 65,535-byte reach
    data = pattern * 5
    blocks = _blocks(encode_bytes(data, block_size=65_536))
    for magic, size, body, _ in blocks[1:]:
        assert magic == b"bv41" and len(body) < 1000  # only possible through the window
        with pytest.raises(lz4.block.LZ4BlockError):
            lz4.block.decompress(body, uncompressed_size=size)
    text = b"".join(b"line %d of a log\n" % (i % 50) for i in range(20_000))
    position, standalone = 0, 0
    for magic, size, body, _ in _blocks(encode_bytes(text, block_size=4096)):
        if magic == b"bv41":
            try:
                alone = lz4.block.decompress(body, uncompressed_size=size)
                standalone += alone == text[position : position + size]
            except lz4.block.LZ4BlockError:
                pass
        position += size
    assert standalone <= 1  # every block after the first leans on the ones before it
    assert _decode(encode_bytes(data, block_size=65_536), len(data)) == data


# -- corrupt streams ---------------------------------------------------------------------------

_DATA = _mixed(random.Random(11), 200_000)
_FRAME = encode_bytes(_DATA, block_sizes=[30_000, 70_000], stored=lambda i: i == 2)


def test_bad_magic() -> None:
    err = _corrupt(b"bv42" + _FRAME[4:], len(_DATA))
    assert "bad block magic" in str(err) and "compressed offset 0" in str(err)
    first = _blocks(_FRAME)[0]
    second = first[3] + len(first[2])
    frame = _FRAME[:second] + b"XX" + _FRAME[second + 2 :]
    assert f"compressed offset {second}" in str(_corrupt(frame, len(_DATA), chunk=1))
    _corrupt(b"x", 10, chunk=1)  # refused on its first byte


@pytest.mark.parametrize("cut", [2, 6, 11, 12, 500, -5, -4])
def test_truncated_streams(cut: int) -> None:
    """A cut header, a cut block, a missing end marker."""
    err = _corrupt(_FRAME[:cut], len(_DATA))
    assert ("no end-of-stream marker" if cut == -4 else "truncated block") in str(err)


def test_data_after_end_marker() -> None:
    assert "after the end-of-stream" in str(_corrupt(_FRAME + b"\0", len(_DATA)))
    dec = AppleLZ4Decoder(len(_DATA))
    dec.feed(_FRAME)
    assert dec.done
    with pytest.raises(CorruptLayerError):
        dec.feed(b"bv4$")


def test_more_output_than_expected_stops_before_decoding() -> None:
    err = _corrupt(_FRAME, len(_DATA) - 1)
    assert "more than the expected" in str(err)


def test_less_output_than_expected() -> None:
    _corrupt(_FRAME, len(_DATA) + 1)


@both
def test_lz4_block_shorter_than_its_header_says() -> None:
    raw = b"0123456789" * 100
    body = lz4.block.compress(raw, store_size=False)
    for before in (b"", b"abc"):  # without and with a window
        prefix = _stored(before) if before else b""
        frame = prefix + _compressed(len(raw) + 1, body) + b"bv4$"
        dec = AppleLZ4Decoder(len(before) + len(raw) + 1)
        with pytest.raises(CorruptLayerError, match=f"fewer .* offset {len(prefix)}$"):
            dec.feed(frame)
        assert dec.decoded == len(before)  # nothing of the bad block came out


def test_block_over_the_size_limit() -> None:
    dec = AppleLZ4Decoder(len(_DATA), max_block_size=20_000)
    with pytest.raises(CorruptLayerError, match="20000-byte limit"):
        dec.feed(_FRAME)


@pytest.mark.parametrize(
    ("frame", "expected", "limit"),
    [
        (b"bv41" + struct.pack("<II", 2**31, 100) + bytes(100), 10_000, 2**40),  # over expected
        (b"bv41" + struct.pack("<II", 2**31, 100) + bytes(100), 2**40, 64 << 20),  # over limit
        (b"bv41" + struct.pack("<II", 2**31, 16) + bytes(16), 2**40, 2**40),  # impossible ratio
        (b"bv41" + struct.pack("<II", 16, 2**31), 2**40, 2**40),  # encoded size absurd
        (b"bv4-" + struct.pack("<I", 2**31), 10_000, 2**40),
        (b"bv4-" + struct.pack("<I", 2**31), 2**40, 64 << 20),
    ],
)
def test_bomb_headers_fail_before_allocating(frame: bytes, expected: int, limit: int) -> None:
    tracemalloc.start()
    try:
        dec = AppleLZ4Decoder(expected, max_block_size=limit)
        with pytest.raises(CorruptLayerError):
            dec.feed(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@both
def test_flipped_byte_inside_an_lz4_block() -> None:
    start = next(at for magic, _, _, at in _blocks(_FRAME) if magic == b"bv41")
    frame = bytearray(_FRAME)
    frame[start] ^= 0xFF  # the first token: literal and match lengths change
    assert "LZ4 block" in str(_corrupt(bytes(frame), len(_DATA)))


@both
def test_every_single_byte_flip_is_caught_or_keeps_the_size() -> None:
    data = b"".join(b"%d," % (i * i % 1000) for i in range(3000))
    frame = encode_bytes(data, block_size=2000)
    caught = 0
    for i in range(len(frame)):
        bad = bytearray(frame)
        bad[i] ^= 0x55
        try:
            assert len(_decode(bytes(bad), len(data))) == len(data)
        except CorruptLayerError:
            caught += 1
    assert caught > len(frame) // 4


@both
def test_memory_stays_bounded_on_a_long_stream() -> None:
    data = _mixed(random.Random(2), 24 << 20)
    frame = encode_bytes(data, block_size=256 << 10)
    del data
    held = []
    tracemalloc.start()
    try:
        dec, total = AppleLZ4Decoder(24 << 20), 0
        for i in range(0, len(frame), 100_000):
            total += sum(len(chunk) for chunk in dec.feed(frame[i : i + 100_000]))
            held.append(tracemalloc.get_traced_memory()[0])
        dec.finish()
    finally:
        tracemalloc.stop()
    assert total == 24 << 20
    # Between feeds the decoder holds at most a cut block, the window and the output it sits
    # in, however long the stream.
    assert max(held) < 1 << 20


# -- arbitrary input ---------------------------------------------------------------------------

_block = st.one_of(
    st.binary(max_size=20),
    st.just(b"bv4$"),
    st.binary(max_size=300).map(_stored),
    st.tuples(st.integers(0, 3000), st.binary(max_size=40)).map(lambda t: _compressed(*t)),
    st.tuples(st.integers(-8, 8), st.binary(max_size=400)).map(
        lambda t: _compressed(max(0, len(t[1]) + t[0]), lz4.block.compress(t[1], store_size=False))
    ),
)


@both
@FUZZ
@given(
    blocks=st.lists(_block, max_size=8),
    expected=st.integers(0, 3000),
    splits=st.lists(st.integers(1, 64), min_size=1),
)
def test_arbitrary_input_only_raises_corrupt_layer(
    blocks: list[bytes], expected: int, splits: list[int]
) -> None:
    stream = b"".join(blocks)
    dec, total, i, k = AppleLZ4Decoder(expected, max_block_size=2048), 0, 0, 0
    try:
        while i < len(stream):
            n = splits[k % len(splits)]
            total += sum(map(len, dec.feed(stream[i : i + n])))
            assert total == dec.decoded <= expected
            i, k = i + n, k + 1
        dec.finish()
    except CorruptLayerError as exc:
        assert "\n" not in str(exc)
    else:
        assert total == expected
