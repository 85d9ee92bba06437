"""The stored form of a chunk: a fixed 48-byte header followed by the encoded payload.

Layout (little endian)::

    magic     4s   b"CKC1"
    version   B    1
    codec     B    Codec value
    width     B    element width used for byte grouping (0 = none)
    flags     B    reserved, 0
    raw_len   Q    length of the decoded bytes
    base      16s  chunk id of the delta base (zeros when none; set for the delta codecs 3 and 4)
    pay_len   Q    length of the payload that follows
    checksum  Q    xxh3-64 of the header's first 40 bytes and the payload

Byte-grouped payloads (codecs 2-4) are the planes of the whole ``width``-byte elements followed by the
last ``raw_len % width`` bytes as they are; a delta covers the whole elements the chunk and its base
both have (``codec.transform``).

Decoding verifies the checksum, decodes, and checks that xxh3-128 of the result equals the chunk id.
Any mismatch raises ``CorruptChunk``: ckptfs never returns bytes it cannot prove are the ones written.
All functions here are pure and may run in worker threads.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import zstandard

from ckptfs.codec.hashing import checksum64, chunk_id
from ckptfs.codec.numeric import WIDTHS as PCO_WIDTHS
from ckptfs.codec.numeric import pco_decode, pco_encode
from ckptfs.codec.transform import (
    best_candidate,
    candidates,
    compressor,
    planes,
    unplanes,
)
from ckptfs.errors import CorruptChunk
from ckptfs.types import ChunkId

MAGIC = b"CKC1"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBBQ16sQQ")
HEADER_SIZE = _HEADER.size
_NO_BASE = b"\0" * 16
# Keep the raw form unless compression saves at least this fraction.
_MIN_SAVING = 0.02


class Codec(enum.IntEnum):
    RAW = 0
    ZSTD = 1
    GROUPED_ZSTD = 2  # byte planes of `width`-byte elements, then zstd
    DELTA_GROUPED_ZSTD = 3  # XOR with the base chunk's plain bytes, byte planes, zstd
    SUB_GROUPED_ZSTD = 4  # zigzag difference with the base (width-byte integers), byte planes, zstd
    PCO = 5  # pcodec of the `width`-byte elements as floats
    SUB_PCO = 6  # pcodec of the wrapping difference with the base (width-byte signed integers)


@dataclass(frozen=True, slots=True)
class FrameHeader:
    codec: Codec
    width: int
    raw_len: int
    base: ChunkId | None
    payload_len: int
    checksum: int


def _pack(codec: Codec, width: int, raw_len: int, base: bytes, payload: bytes | memoryview) -> bytes:
    prefix = _HEADER.pack(MAGIC, FORMAT_VERSION, codec, width, 0, raw_len, base, len(payload), 0)[:40]
    return b"".join((prefix, struct.pack("<Q", checksum64(prefix, payload)), payload))  # one copy of the payload


def encode_raw(data: bytes | memoryview) -> bytes:
    """A frame of ``data`` as it is (decoding costs a copy and the id check: for copies read often)."""
    return _pack(Codec.RAW, 0, len(data), _NO_BASE, data)


_DELTA_CODECS = {"xor": Codec.DELTA_GROUPED_ZSTD, "sub": Codec.SUB_GROUPED_ZSTD}
_KINDS = {codec: kind for kind, codec in _DELTA_CODECS.items()}


def encode(
    data: bytes | memoryview,
    level: int = 3,
    width: int = 0,
    base: tuple[ChunkId, bytes | memoryview] | None = None,
) -> tuple[bytes, Codec]:
    """Encode ``data`` into a frame: raw, zstd, byte-grouped zstd or — when ``base`` = (id, plain bytes)
    is given — XOR with or zigzag difference to the base, byte-grouped, zstd.

    The candidates (``transform.candidates``: element width 1/2/4, or the ``width`` the format told)
    are ranked on a sample, the winner is compressed whole, and the frame falls back to raw when that does not help.
    Worker-thread safe (each thread has its own compressors). Returns the frame and the codec chosen.
    """
    raw_len = len(data)
    if raw_len == 0:
        return _pack(Codec.RAW, 0, 0, _NO_BASE, b""), Codec.RAW
    base_bytes = None if base is None else base[1]
    # width >= 1: the caller knows the element width (1 = plain bytes); 0: rank 1, 2 and 4 on a sample
    widths = [width] if width >= 1 else [1, 2, 4]
    kind, w = best_candidate(data, base_bytes, candidates(widths, base_bytes is not None, raw_len))
    payload = compressor(level, w).compress(planes(kind, data, base_bytes, w))
    if kind in _DELTA_CODECS and base is not None:
        codec, used_base = _DELTA_CODECS[kind], bytes(base[0])
    else:
        codec, used_base = (Codec.GROUPED_ZSTD if w > 1 else Codec.ZSTD), _NO_BASE
    if len(payload) > raw_len * (1 - _MIN_SAVING):
        return _pack(Codec.RAW, 0, raw_len, _NO_BASE, data), Codec.RAW
    return _pack(codec, w if w > 1 else 0, raw_len, used_base, payload), codec


def encode_pco(
    data: bytes | memoryview, width: int, level: int, base: tuple[ChunkId, bytes | memoryview] | None = None
) -> bytes:
    """A pcodec frame of ``data`` as ``width``-byte floats, or — with ``base`` — of the wrapping integer
    difference to the base's elements. ``width`` is 2, 4 or 8 and divides ``len(data)``.

    Slower than ``encode`` (half zstd-3's speed for fp32, a quarter for bf16), so ckptfs uses it off
    the ingest path, on chunks already stored (``files.compact``).
    """
    if width not in PCO_WIDTHS or len(data) % width:
        raise ValueError(f"pcodec needs whole {width}-byte elements")
    if base is None:
        return _pack(Codec.PCO, width, len(data), _NO_BASE, pco_encode("plain", data, None, width, level))
    if len(base[1]) != len(data):
        raise ValueError("base and data differ in length")
    payload = pco_encode("sub", data, base[1], width, level)
    return _pack(Codec.SUB_PCO, width, len(data), bytes(base[0]), payload)


def parse_header(frame: bytes | memoryview, frame_len: int | None = None) -> FrameHeader:
    """Parse and sanity-check a frame header: ``frame`` is the whole frame, or at least its header when
    ``frame_len`` gives the whole frame's length. Raises ``CorruptChunk``."""
    if frame_len is None:
        frame_len = len(frame)
    if len(frame) < HEADER_SIZE or frame_len < HEADER_SIZE:
        raise CorruptChunk(f"frame too short ({frame_len} bytes)")
    magic, version, codec, width, _flags, raw_len, base, pay_len, checksum = _HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise CorruptChunk("bad frame magic")
    if version != FORMAT_VERSION:
        raise CorruptChunk(f"unsupported frame format version {version}")
    try:
        codec_enum = Codec(codec)
    except ValueError:
        raise CorruptChunk(f"unknown codec {codec}") from None
    if pay_len != frame_len - HEADER_SIZE:
        raise CorruptChunk(f"payload length {pay_len} does not match frame size {frame_len}")
    return FrameHeader(codec_enum, width, raw_len, None if base == _NO_BASE else ChunkId(base), pay_len, checksum)


def _decode_pco(hdr: FrameHeader, payload: memoryview, base: bytes | memoryview | None) -> bytes:
    if hdr.width not in PCO_WIDTHS:
        raise CorruptChunk(f"pcodec frame with element width {hdr.width}")
    if hdr.codec == Codec.PCO:
        return pco_decode("plain", payload, None, hdr.width)
    if base is None or len(base) != hdr.raw_len:
        raise CorruptChunk("delta frame decoded without its base (or with a base of the wrong size)")
    return pco_decode("sub", payload, base, hdr.width)


def decode(frame: bytes | memoryview, expected: ChunkId, base: bytes | memoryview | None = None) -> bytes:
    """Decode a frame and verify it is the chunk ``expected``. Raises ``CorruptChunk`` on any mismatch.

    A delta frame needs ``base``: the plain bytes of the chunk named in its header (``parse_header().base``).
    """
    view = memoryview(frame)
    hdr = parse_header(view)
    payload = view[HEADER_SIZE:]
    if checksum64(view[:40], payload) != hdr.checksum:
        raise CorruptChunk("frame checksum mismatch")
    try:
        if hdr.codec == Codec.RAW:
            data = bytes(payload)
        elif hdr.codec in (Codec.PCO, Codec.SUB_PCO):
            data = _decode_pco(hdr, payload, base)
        else:
            plain = zstandard.ZstdDecompressor().decompress(payload, max_output_size=hdr.raw_len)
            kind = _KINDS.get(hdr.codec, "plain")
            if kind != "plain" and base is None:
                raise CorruptChunk("delta frame decoded without its base")
            if kind == "sub" and hdr.width not in (2, 4, 8):
                raise CorruptChunk(f"difference frame with element width {hdr.width}")
            data = unplanes(kind, plain, base, hdr.width) if kind != "plain" or hdr.width > 1 else plain
    except (zstandard.ZstdError, ValueError) as exc:
        raise CorruptChunk(f"cannot decompress: {exc}") from None
    return _proven(data, hdr, expected)


def _proven(data: bytes, hdr: FrameHeader, expected: ChunkId) -> bytes:
    """``data`` once its length is the header's and it hashes to ``expected``. Raises ``CorruptChunk``."""
    if len(data) != hdr.raw_len:
        raise CorruptChunk(f"decoded {len(data)} bytes, header says {hdr.raw_len}")
    if chunk_id(data) != expected:
        raise CorruptChunk("decoded bytes do not hash to the chunk id")
    return data


def decode_raw_split(header: bytes, payload: bytes, expected: ChunkId) -> bytes:
    """``decode`` of a RAW frame read as its header and its payload apart: the payload is the chunk, so
    it is returned as it is (no copy), once the checksum and the id prove it. Raises ``CorruptChunk``
    (also for a frame of another codec)."""
    hdr = parse_header(header, HEADER_SIZE + len(payload))
    if hdr.codec != Codec.RAW:
        raise CorruptChunk(f"expected a raw frame, found codec {int(hdr.codec)}")
    if checksum64(header[:40], payload) != hdr.checksum:
        raise CorruptChunk("frame checksum mismatch")
    return _proven(payload, hdr, expected)
