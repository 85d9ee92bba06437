"""Byte grouping ("byte planes"): element byte k of every element stored together.

Float tensors compress far better this way: exponent bytes are alike across elements, mantissa
low bytes are noise. Pure numpy; releases the GIL for large copies.
"""

from __future__ import annotations

import numpy as np
import zstandard

_SAMPLE = 128 * 1024


def group_bytes(data: bytes | memoryview, width: int) -> bytes:
    """Return the ``width`` byte planes of ``data`` concatenated. ``len(data)`` must be a multiple of width."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return arr.reshape(-1, width).T.tobytes()


def ungroup_bytes(data: bytes | memoryview, width: int) -> bytes:
    """Inverse of ``group_bytes``."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return arr.reshape(width, -1).T.tobytes()


def xor_bytes(a: bytes | memoryview, b: bytes | memoryview) -> bytes:
    """Bytewise XOR of two equally long buffers (its own inverse)."""
    n = len(a)
    if n % 8 == 0:
        x, y = np.frombuffer(a, dtype=np.uint64), np.frombuffer(b, dtype=np.uint64)
    else:
        x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    return np.bitwise_xor(x, y).tobytes()


def best_candidate(sources: list[bytes | memoryview], widths: list[int]) -> tuple[int, int]:
    """Rank (source index, element width) pairs by zstd-1 size of a sample from the middle of each source.

    ``sources`` are equally long (the plain bytes, and the XOR with a base when there is one). Returns
    the best (index, width); ties prefer the earlier source and the smaller width.
    """
    n = len(sources[0])
    if n < 4096 or (len(sources) == 1 and len(widths) == 1):
        return 0, widths[0] if n % widths[0] == 0 else 1
    size = min(_SAMPLE, n) & ~7
    start = max(0, n // 2 - size // 2) & ~7
    cctx = zstandard.ZstdCompressor(level=1)
    best: tuple[int, int, int] | None = None
    for i, src in enumerate(sources):
        sample = bytes(memoryview(src)[start : start + size])
        for w in widths:
            length = len(cctx.compress(group_bytes(sample, w) if w > 1 else sample))
            if best is None or length < best[0]:
                best = (length, i, w)
    assert best is not None
    return best[1], best[2]
