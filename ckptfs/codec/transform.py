"""Lossless transforms of chunk bytes before zstd, and the choice between them.

* Byte grouping ("byte planes"): byte k of every element stored together. Float tensors compress
  far better this way: exponent bytes are alike across elements, mantissa low bytes are noise.
* XOR with the base chunk: bits that did not change become zeros.
* Zstd on byte planes uses a small match-finder table (``compressor``). Planes of floats are mostly
  noise with short runs; with level 1's 16K-entry table zstd kept finding 6-byte matches in noise
  that cost more than the literals they replace. A 128-entry table stores AdamW checkpoints' planes
  0.5-1.7 % smaller and compresses them 1.05-1.8x faster (and decodes them faster too).
* Zigzag difference with the base (``sub``): the elements, read as ``width``-byte integers, minus the
  base's, wrapping, zigzag-mapped so small moves either way are small numbers. A float that moved a
  little changes its bit pattern by a small integer even when the change carries across many bits
  (0x3F7FFFFF -> 0x3F800000 differs in 24 bits but by 1): measured on AdamW checkpoints, 4 % smaller
  than XOR for fp32 and 8 % for bf16.

Lengths need not line up. Byte planes cover the whole elements; the last ``len % width`` bytes follow
as they are. A base of another length (a piece that took in a zip header of different size) is
applied to the elements both have; the rest of the chunk is kept plain. Decoding finds the same
split from the lengths of the chunk and of its base.

Pure numpy; releases the GIL for large copies. ``planes`` and ``unplanes`` work in per-thread
scratch buffers: fresh numpy temporaries of chunk size cost more in page faults and page zeroing
(numpy asks for huge pages for them) than the arithmetic itself.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

# Candidates are ranked on this many bytes from the middle of a chunk: on AdamW checkpoints 64 KiB
# chose as well as 128 KiB (sizes within 0.1 %), with the width known or ranked (``_estimate``).
_SAMPLE = 64 * 1024
_TINY = 4096
_ZSTD_BLOCK = 128 * 1024
# log2 of the match finder's hash table for byte planes at levels using zstd's "fast" strategy.
_PLANES_HASH_LOG = 7
# Chunks larger than this get fresh buffers instead of growing a thread's scratch space.
_SCRATCH_MAX = 64 * 1024 * 1024


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.bufs: list[np.ndarray] = [np.empty(0, np.uint8), np.empty(0, np.uint8)]
        self.cctx: dict[tuple[int, bool], zstandard.ZstdCompressor] = {}


_scratch = _Scratch()


def _buffer(i: int, nbytes: int) -> np.ndarray:
    """Scratch buffer ``i`` (0 or 1) of this thread, ``nbytes`` long (uint8)."""
    if nbytes > _SCRATCH_MAX:
        return np.empty(nbytes, np.uint8)
    buf = _scratch.bufs[i]
    if len(buf) < nbytes:
        buf = _scratch.bufs[i] = np.empty(nbytes, np.uint8)
    return buf[:nbytes]


def compressor(level: int, width: int) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor for plain bytes (``width`` <= 1) or byte planes at ``level``."""
    key = (level, width > 1)
    cctx = _scratch.cctx.get(key)
    if cctx is None:
        params = zstandard.ZstdCompressionParameters.from_level(level)
        if width > 1 and params.strategy == zstandard.STRATEGY_FAST:
            params = zstandard.ZstdCompressionParameters.from_level(level, hash_log=_PLANES_HASH_LOG)
        cctx = _scratch.cctx[key] = zstandard.ZstdCompressor(compression_params=params)
    return cctx


_INT = {2: (np.int16, np.uint16), 4: (np.int32, np.uint32), 8: (np.int64, np.uint64)}


def _delta_span(kind: str, base: bytes | memoryview | None, body: int, width: int) -> int:
    """How many leading bytes the transform ``kind`` applies to: the whole elements both chunks have."""
    if kind == "plain" or base is None or (kind == "sub" and width not in _INT):
        return 0
    return min(body, len(base) - len(base) % width)


def _xor_dtype(m: int) -> type[np.unsignedinteger]:
    return np.uint64 if m % 8 == 0 else np.uint8


def planes(kind: str, data: bytes | memoryview, base: bytes | memoryview | None, width: int) -> memoryview:
    """The stored form before zstd: ``data`` XOR ``base`` ('xor'), the zigzag difference to ``base``
    ('sub') or ``data`` itself ('plain'), cut into ``width`` byte planes.

    The result lives in this thread's scratch space: it is valid until the thread's next call.
    """
    n = len(data)
    w = max(width, 1)
    body = n - n % w
    m = _delta_span(kind, base, body, w)
    src = np.frombuffer(data, dtype=np.uint8)
    if m:
        assert base is not None
        out = _buffer(0, n)
        if kind == "xor":
            dt = _xor_dtype(m)
            np.bitwise_xor(src[:m].view(dt), np.frombuffer(base, dtype=np.uint8)[:m].view(dt), out=out[:m].view(dt))
        else:
            signed = _INT[w][0]
            d, sign = out[:m].view(signed), _buffer(1, m).view(signed)
            np.subtract(src[:m].view(signed), np.frombuffer(base, dtype=np.uint8)[:m].view(signed), out=d)
            np.right_shift(d, 8 * w - 1, out=sign)
            np.left_shift(d, 1, out=d)
            np.bitwise_xor(d, sign, out=d)
        out[m:] = src[m:]
        src = out
    if w == 1:
        return src.data
    grouped = _buffer(1, n)
    np.copyto(grouped[:body].reshape(w, -1), src[:body].reshape(-1, w).T)
    grouped[body:] = src[body:]
    return grouped.data


def unplanes(kind: str, grouped: bytes | memoryview, base: bytes | memoryview | None, width: int) -> bytes:
    """Inverse of ``planes``: the chunk's bytes from its stored form (before zstd)."""
    n = len(grouped)
    w = max(width, 1)
    body = n - n % w
    m = _delta_span(kind, base, body, w)
    flat = np.frombuffer(grouped, dtype=np.uint8)
    if w > 1:
        flat = _buffer(0, n)
        columns, rows = flat[:body].reshape(-1, w), np.frombuffer(grouped, dtype=np.uint8)[:body].reshape(w, -1)
        for k in range(w):  # one strided copy per plane: 4-10x faster than numpy's transposing copy
            columns[:, k] = rows[k]
        flat[body:] = np.frombuffer(grouped, dtype=np.uint8)[body:]
    if not m:
        return flat.tobytes()
    assert base is not None
    old = np.frombuffer(base, dtype=np.uint8)[:m]
    out = _buffer(1, n)
    if kind == "xor":
        dt = _xor_dtype(m)
        np.bitwise_xor(flat[:m].view(dt), old.view(dt), out=out[:m].view(dt))
    else:  # sub; w > 1, so ``flat`` is scratch space and may be overwritten
        signed, unsigned = _INT[w]
        z, sign = flat[:m].view(signed), out[:m].view(signed)
        np.bitwise_and(z, 1, out=sign)
        np.negative(sign, out=sign)  # 0 or all ones
        np.right_shift(flat[:m].view(unsigned), 1, out=flat[:m].view(unsigned))
        np.bitwise_xor(z, sign, out=sign)
        np.add(sign, old.view(signed), out=sign)
    out[m:] = flat[m:]
    return out.tobytes()


def candidates(widths: list[int], with_base: bool, length: int) -> list[tuple[str, int]]:
    """The (transform, width) pairs worth ranking: each width plain, and against a base the zigzag
    difference for elements (XOR for single bytes).

    XOR of elements is not ranked: it won a few nearly unchanged pieces of AdamW checkpoints, yet
    leaving it out changed the series' sizes by -0.01 % (fp32) and -0.005 % (bf16), and each candidate
    costs a zstd pass over the sample. Chunks under ``_TINY`` bytes (zip headers, small records) rank bytes only.
    """
    if length < _TINY:
        widths = [1]
    out = [("plain", w) for w in widths]
    if with_base:
        out += [("sub" if w in _INT else "xor", w) for w in widths]
    return out


def _estimate(grouped: memoryview, width: int, chunk_len: int) -> int:
    """zstd-1 size of a sample's stored form. When the chunk's planes fill zstd blocks (128 KiB) of their
    own, each block with its own Huffman table, the sample's planes are compressed one by one: together
    they would share blocks and tables, and byte planes would look no better than plain bytes."""
    cctx = compressor(1, width)
    if width <= 1 or chunk_len // width < _ZSTD_BLOCK:
        return len(cctx.compress(grouped))
    step = len(grouped) // width
    tail = len(grouped) - step * width
    return tail + sum(len(cctx.compress(grouped[k * step : (k + 1) * step])) for k in range(width))


def best_candidate(
    data: bytes | memoryview, base: bytes | memoryview | None, options: list[tuple[str, int]]
) -> tuple[str, int]:
    """Rank (transform, width) options by the zstd-1 size (``_estimate``) of ``data`` (of a 64 KiB sample
    from the middle of the part a base covers, when it is larger). Ties prefer the earlier option."""
    n = len(data)
    if len(options) == 1:
        return options[0]
    span = n if base is None else min(n, len(base))
    size = min(n, _SAMPLE)
    start = ((span - size) // 2) & ~7 if span > size else 0
    sample = memoryview(data)[start : start + size]
    base_sample = None if base is None else memoryview(base)[start : start + size]
    best: tuple[int, str, int] | None = None
    for kind, w in options:
        length = _estimate(planes(kind, sample, base_sample, w), w, n)
        if best is None or length < best[0]:
            best = (length, kind, w)
    assert best is not None
    return best[1], best[2]
