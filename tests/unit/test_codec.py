"""Frame encode/decode: lossless for any input, and every corruption is detected."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptfs.codec import Codec, chunk_id, decode, decode_raw_split, encode, encode_pco, encode_raw, parse_header
from ckptfs.codec.frame import HEADER_SIZE
from ckptfs.codec.numeric import pco_decode, pco_encode
from ckptfs.codec.transform import planes, unplanes
from ckptfs.errors import CorruptChunk

DELTA = (Codec.DELTA_GROUPED_ZSTD, Codec.SUB_GROUPED_ZSTD, Codec.SUB_PCO)
PCO = 10  # the default ingest.pco_level


@given(st.binary(max_size=20_000), st.sampled_from([0, 1, 2, 4, 8]), st.integers(1, 5))
@settings(max_examples=300)
def test_roundtrip_any_bytes(data, width, level):
    frame, codec = encode(data, level, width)
    assert decode(frame, chunk_id(data)) == data
    assert parse_header(frame).raw_len == len(data)


@given(
    st.sampled_from([np.float16, np.float32, np.float64]),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True, width=16), max_size=3000),
)
@settings(deadline=None)
def test_roundtrip_float_arrays_with_specials(dtype, values):
    arr = np.array(values, dtype=np.float64).astype(dtype)
    data = arr.tobytes()
    for frame in (encode(data, 3, arr.itemsize)[0], encode_pco(data, arr.itemsize, PCO)):
        out = np.frombuffer(decode(frame, chunk_id(data)), dtype=dtype)
        assert out.tobytes() == data  # bit-exact, NaN payloads included


@given(st.sampled_from([2, 4, 8]), st.sampled_from(["plain", "sub"]), st.integers(0, 12), st.data())
@settings(deadline=None)
def test_pcodec_forms_are_exact_for_any_bits(width, kind, level, data):
    n = data.draw(st.integers(0, 300))
    new = data.draw(st.binary(min_size=n * width, max_size=n * width))  # any bits: NaN payloads, -0.0, ...
    old = data.draw(st.binary(min_size=n * width, max_size=n * width)) if kind == "sub" else None
    payload = pco_encode(kind, new, old, width, level)
    assert pco_decode(kind, payload, old, width) == new


def _as(values: np.ndarray, dtype: str) -> bytes:
    f32 = values.astype(np.float32)
    if dtype == "bfloat16":  # the top half of each float32 (truncated)
        return (f32.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return f32.tobytes()


def _from(data: bytes, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, np.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pcodec_frames_beat_zstd_on_floats_and_need_their_base(dtype):
    rng = np.random.default_rng(11)
    n = 1 << 18
    a = _as(rng.standard_normal(n) * 0.02, dtype)
    b = _as(_from(a, dtype) + rng.standard_normal(n).astype(np.float32) * 1e-4, dtype)
    w = 2 if dtype == "bfloat16" else 4
    key = encode_pco(a, w, PCO)
    assert parse_header(key).codec == Codec.PCO and len(key) < len(encode(a, 3, w)[0])
    delta = encode_pco(b, w, PCO, (chunk_id(a), a))
    assert parse_header(delta).codec == Codec.SUB_PCO and parse_header(delta).base == chunk_id(a)
    assert len(delta) < len(encode(b, 3, w, (chunk_id(a), a))[0])
    assert decode(key, chunk_id(a)) == a and decode(delta, chunk_id(b), a) == b
    with pytest.raises(CorruptChunk):
        decode(delta, chunk_id(b))  # a Pco difference needs its base too
    with pytest.raises(CorruptChunk):
        decode(delta, chunk_id(b), bytes(len(a)))  # the wrong base: the id check fails
    with pytest.raises(ValueError):
        encode_pco(a[:-1], w, PCO)  # not whole elements


def test_grouping_helps_floats_and_is_chosen():
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(1 << 18) * 0.02).astype(np.float32).tobytes()
    frame, codec = encode(data, 3, 4)
    assert codec == Codec.GROUPED_ZSTD
    plain, plain_codec = encode(data, 3, 1)  # width 1: no grouping
    assert plain_codec == Codec.ZSTD and len(frame) < len(plain)
    auto, auto_codec = encode(data, 3, 0)  # width 0: picked on a sample
    assert auto_codec == Codec.GROUPED_ZSTD and parse_header(auto).width == 4


def _drifted(rng, n, dtype, scale):
    w = (rng.standard_normal(n) * 0.02).astype(np.float32)
    w2 = w + (rng.standard_normal(n) * scale).astype(np.float32)
    return np.asarray(w, dtype=dtype).tobytes(), np.asarray(w2, dtype=dtype).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_delta_against_a_close_base_wins_and_needs_the_base(dtype):
    rng = np.random.default_rng(5)
    a, b = _drifted(rng, 1 << 18, dtype, 1e-5)
    frame, codec = encode(b, 3, 0, (chunk_id(a), a))
    assert codec in DELTA and parse_header(frame).base == chunk_id(a)
    alone, _ = encode(b, 3, 0)
    assert len(frame) < 0.9 * len(alone)
    assert decode(frame, chunk_id(b), a) == b
    with pytest.raises(CorruptChunk):
        decode(frame, chunk_id(b))  # no base
    other = bytes(len(a))
    with pytest.raises(CorruptChunk):
        decode(frame, chunk_id(b), other)  # wrong base: caught by the id check


def test_unrelated_base_is_not_used():
    rng = np.random.default_rng(6)
    a = rng.bytes(1 << 16)
    b = (rng.standard_normal(1 << 14) * 0.02).astype(np.float32).tobytes()
    frame, codec = encode(b, 3, 0, (chunk_id(a), a))
    assert codec not in DELTA and parse_header(frame).base is None
    assert decode(frame, chunk_id(b)) == b


@given(
    st.sampled_from([np.float16, np.float32, np.float64]),
    st.integers(0, 5000),
    st.floats(1e-8, 1.0),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 1, 2, 4]),
)
@settings(max_examples=150, deadline=None)
def test_delta_roundtrip_property(dtype, n, scale, seed, width):
    rng = np.random.default_rng(seed)
    a, b = _drifted(rng, n, dtype, scale)
    if n and seed % 3 == 0:  # sprinkle specials: NaN, Inf, denormals, negative zero
        arr = np.frombuffer(b, dtype=dtype).copy()
        arr[:: max(1, n // 7)] = np.array([np.nan, np.inf, -np.inf, -0.0, np.finfo(dtype).tiny / 4])[
            np.arange(len(arr[:: max(1, n // 7)])) % 5
        ].astype(dtype)
        b = arr.tobytes()
    frame, codec = encode(b, 1, width, (chunk_id(a), a))
    base = a if codec in DELTA else None
    assert decode(frame, chunk_id(b), base) == b
    w = np.dtype(dtype).itemsize
    frame = encode_pco(b, w, PCO, (chunk_id(a), a)) if seed % 2 else encode_pco(b, w, PCO)
    base = a if parse_header(frame).base else None
    assert decode(frame, chunk_id(b), base) == b


def test_incompressible_is_stored_raw():
    data = np.random.default_rng(1).bytes(100_000)
    frame, codec = encode(data, 3, 0)
    assert codec == Codec.RAW and len(frame) == len(data) + HEADER_SIZE


def _reference_planes(kind: str, new: bytes, old: bytes, width: int) -> bytes:
    """The stored form spelled out element by element: the transform on the whole elements both
    chunks have, the rest plain, byte planes of the whole elements, the tail as it is."""
    w = max(width, 1)
    body = len(new) - len(new) % w
    m = 0 if kind == "plain" else min(body, len(old) - len(old) % w)
    out = bytearray(new)
    for i in range(0, m, w):
        if kind == "xor":
            out[i : i + w] = bytes(a ^ b for a, b in zip(new[i : i + w], old[i : i + w], strict=True))
        else:
            d = (int.from_bytes(new[i : i + w], "little") - int.from_bytes(old[i : i + w], "little")) % (1 << 8 * w)
            signed = d - (1 << 8 * w) if d >> (8 * w - 1) else d
            zz = (signed << 1) ^ (-1 if signed < 0 else 0)
            out[i : i + w] = (zz % (1 << 8 * w)).to_bytes(w, "little")
    planes_ = b"".join(bytes(out[k:body:w]) for k in range(w))
    return planes_ + bytes(out[body:])


@given(st.sampled_from(["plain", "xor", "sub"]), st.sampled_from([1, 2, 4, 8]), st.data())
@settings(max_examples=300)
def test_planes_match_the_reference_for_any_lengths(kind, width, data):
    if kind == "sub" and width == 1:
        width = 2
    # two calls of different sizes in a row: the second must not see the first's scratch bytes
    for _ in range(2):
        new = data.draw(st.binary(max_size=300))
        old = data.draw(st.binary(max_size=300) | st.just(new[: len(new) // 2]))
        expected = _reference_planes(kind, new, old, width)
        assert bytes(planes(kind, new, old, width)) == expected
        assert unplanes(kind, expected, old, width) == new


@given(st.binary(max_size=5000), st.binary(max_size=5000), st.sampled_from([0, 1, 2, 4, 8]))
@settings(max_examples=200)
def test_delta_against_a_base_of_another_length_round_trips(new, old, width):
    frame, codec = encode(new, 1, width, (chunk_id(old), old))
    hdr = parse_header(frame)
    assert decode(frame, chunk_id(new), old if hdr.base is not None else None) == new


def test_a_longer_piece_still_deltas_against_its_shorter_base():
    rng = np.random.default_rng(5)
    old = (rng.standard_normal(50_000) * 0.02).astype(np.float32)
    new = (old + rng.standard_normal(50_000).astype(np.float32) * 1e-6).astype(np.float32)
    header = b"PK\x03\x04" + bytes(58)  # the zip header of the next record, taken into the piece
    a, b = old.tobytes(), new.tobytes() + header
    delta, codec = encode(b, 1, 4, (chunk_id(a), a))
    alone, _ = encode(b, 1, 4)
    assert codec == Codec.SUB_GROUPED_ZSTD and len(delta) < 0.8 * len(alone)
    assert decode(delta, chunk_id(b), a) == b


@pytest.mark.parametrize("kind", ["zeros", "text", "random", "pco"])
def test_every_single_bit_flip_is_detected(kind):
    floats = (np.random.default_rng(4).standard_normal(2500) * 0.02).astype(np.float16).tobytes()
    data = {
        "zeros": bytes(5000),
        "text": b"checkpoint " * 500,
        "random": np.random.default_rng(2).bytes(5000),
        "pco": floats,
    }[kind]
    frame = encode_pco(data, 2, PCO) if kind == "pco" else encode(data, 3, 0)[0]
    cid = chunk_id(data)
    rng = np.random.default_rng(3)
    for pos in list(range(0, HEADER_SIZE)) + list(rng.integers(HEADER_SIZE, len(frame), 60)):
        bad = bytearray(frame)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(CorruptChunk):
            decode(bytes(bad), cid)


def test_wrong_id_and_truncation_are_detected():
    frame, _ = encode(b"abc" * 100, 3, 0)
    with pytest.raises(CorruptChunk):
        decode(frame, chunk_id(b"other"))
    with pytest.raises(CorruptChunk):
        decode(frame[:-1], chunk_id(b"abc" * 100))
    with pytest.raises(CorruptChunk):
        decode(frame[:10], chunk_id(b"abc" * 100))


@given(st.sampled_from([2, 4, 8]), st.data())
def test_zigzag_difference_is_exact_for_any_bits(width, data):
    n = data.draw(st.integers(0, 64))
    new = data.draw(st.binary(min_size=n * width, max_size=n * width))
    old = data.draw(st.binary(min_size=n * width, max_size=n * width))
    assert unplanes("sub", planes("sub", new, old, width), old, width) == new


def test_difference_beats_xor_across_a_carry():
    rng = np.random.default_rng(7)
    old = rng.integers(0x3F7FFE00, 0x3F7FFFFF, 1 << 14, dtype=np.uint32)
    new = old + rng.integers(1, 1024, 1 << 14, dtype=np.uint32)  # many cross 0x3F800000: XOR sees ~24 bits flip
    a, b = old.tobytes(), new.tobytes()
    frame, codec = encode(b, 3, 4, (chunk_id(a), a))
    assert codec == Codec.SUB_GROUPED_ZSTD
    assert decode(frame, chunk_id(b), a) == b


def test_a_raw_frame_read_as_header_and_payload_decodes_without_a_copy_and_any_damage_is_caught():
    data = os.urandom(100_000)
    cid = chunk_id(data)
    frame = encode_raw(data)
    head, payload = frame[:HEADER_SIZE], frame[HEADER_SIZE:]
    out = decode_raw_split(head, payload, cid)
    assert out == data and out is payload  # the payload itself, not a copy
    flipped = bytearray(payload)
    flipped[777] ^= 1
    for h, p, c in [
        (head, bytes(flipped), cid),  # a flipped byte
        (head, payload[:-1], cid),  # torn
        (head[:20], payload, cid),  # torn header
        (head, payload, chunk_id(b"other")),  # another chunk's copy
    ]:
        with pytest.raises(CorruptChunk):
            decode_raw_split(h, p, c)
    zeros = bytes(100_000)
    packed = encode(zeros, 3, 4)[0]  # a zstd frame: its payload is not the chunk
    with pytest.raises(CorruptChunk):
        decode_raw_split(packed[:HEADER_SIZE], packed[HEADER_SIZE:], chunk_id(zeros))
