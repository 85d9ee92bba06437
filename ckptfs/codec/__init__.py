"""Chunk codec: hashing, framing and (lossless) compression. Pure functions, safe in worker threads."""

from __future__ import annotations

from ckptfs.codec.frame import (
    HEADER_SIZE,
    Codec,
    FrameHeader,
    decode,
    decode_raw_split,
    encode,
    encode_pco,
    encode_raw,
    parse_header,
)
from ckptfs.codec.hashing import chunk_id

__all__ = [
    "HEADER_SIZE",
    "Codec",
    "FrameHeader",
    "chunk_id",
    "decode",
    "decode_raw_split",
    "encode",
    "encode_pco",
    "encode_raw",
    "parse_header",
]
