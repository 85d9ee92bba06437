"""The stored form of a chunk: a fixed 48-byte header followed by the encoded payload.

Layout (little endian)::

    magic     4s   b"CKC1"
    version   B    1
    codec     B    Codec value
    width     B    element width used for byte grouping (0 = none)
    flags     B    reserved, 0
    raw_len   Q    length of the decoded bytes
    base      16s  chunk id of the delta base (zeros when none)
    pay_len   Q    length of the payload that follows
    checksum  Q    xxh3-64 of the header's first 40 bytes and the payload

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
from ckptfs.codec.transform import group_bytes, ungroup_bytes
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
    return prefix + struct.pack("<Q", checksum64(prefix, payload)) + bytes(payload)


def encode(data: bytes | memoryview, level: int = 3, width: int = 0) -> tuple[bytes, Codec]:
    """Encode ``data`` into a frame, choosing the smallest of raw, zstd and (if ``width`` > 1) grouped zstd.

    Worker-thread safe (creates its own compressor). Returns the frame and the codec chosen.
    """
    raw_len = len(data)
    cctx = zstandard.ZstdCompressor(level=level)
    best_codec, best_payload = Codec.RAW, data
    if raw_len:
        candidate = cctx.compress(data)
        if len(candidate) < len(best_payload):
            best_codec, best_payload = Codec.ZSTD, candidate
        if width > 1 and raw_len % width == 0:
            grouped = cctx.compress(group_bytes(data, width))
            if len(grouped) < len(best_payload):
                best_codec, best_payload = Codec.GROUPED_ZSTD, grouped
    if best_codec != Codec.RAW and len(best_payload) > raw_len * (1 - _MIN_SAVING):
        best_codec, best_payload = Codec.RAW, data
    used_width = width if best_codec == Codec.GROUPED_ZSTD else 0
    return _pack(best_codec, used_width, raw_len, _NO_BASE, best_payload), best_codec


def parse_header(frame: bytes | memoryview) -> FrameHeader:
    """Parse and sanity-check a frame header. Raises ``CorruptChunk``."""
    if len(frame) < HEADER_SIZE:
        raise CorruptChunk(f"frame too short ({len(frame)} bytes)")
    magic, version, codec, width, _flags, raw_len, base, pay_len, checksum = _HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise CorruptChunk("bad frame magic")
    if version != FORMAT_VERSION:
        raise CorruptChunk(f"unsupported frame format version {version}")
    try:
        codec_enum = Codec(codec)
    except ValueError:
        raise CorruptChunk(f"unknown codec {codec}") from None
    if pay_len != len(frame) - HEADER_SIZE:
        raise CorruptChunk(f"payload length {pay_len} does not match frame size {len(frame)}")
    return FrameHeader(codec_enum, width, raw_len, None if base == _NO_BASE else ChunkId(base), pay_len, checksum)


def decode(frame: bytes | memoryview, expected: ChunkId) -> bytes:
    """Decode a frame and verify it is the chunk ``expected``. Raises ``CorruptChunk`` on any mismatch."""
    view = memoryview(frame)
    hdr = parse_header(view)
    payload = view[HEADER_SIZE:]
    if checksum64(view[:40], payload) != hdr.checksum:
        raise CorruptChunk("frame checksum mismatch")
    try:
        if hdr.codec == Codec.RAW:
            data = bytes(payload)
        elif hdr.codec == Codec.ZSTD:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=hdr.raw_len)
        else:
            plain = zstandard.ZstdDecompressor().decompress(payload, max_output_size=hdr.raw_len)
            data = ungroup_bytes(plain, hdr.width)
    except zstandard.ZstdError as exc:
        raise CorruptChunk(f"cannot decompress: {exc}") from None
    if len(data) != hdr.raw_len:
        raise CorruptChunk(f"decoded {len(data)} bytes, header says {hdr.raw_len}")
    if chunk_id(data) != expected:
        raise CorruptChunk("decoded bytes do not hash to the chunk id")
    return data
