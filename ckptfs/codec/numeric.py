"""pcodec (Pco) for chunks of numbers: an entropy coder that bins each element's value and writes the
offset within its bin as raw bits, so it models magnitudes at bit granularity where byte planes + zstd
only see whole bytes. Measured on AdamW checkpoints it stores 3-7 % less than byte-grouped zstd for
float keyframes and 2-5 % less for integer differences, at roughly half zstd-3's speed.

Two forms, both lossless for every bit pattern (NaN payloads, -0.0, denormals):

* ``plain``: the elements as IEEE floats of ``width`` bytes (float16 for bf16 too: both keep the sign in
  the top bit, which is all Pco's order-preserving float mapping relies on);
* ``sub``: the wrapping integer difference to the base's elements, as signed integers.

Pure functions; the compressor releases the GIL.
"""

from __future__ import annotations

import numpy as np
from pcodec import ChunkConfig, DeltaSpec, ModeSpec, standalone

_FLOAT = {2: np.float16, 4: np.float32, 8: np.float64}
_INT = {2: np.int16, 4: np.int32, 8: np.int64}
WIDTHS = tuple(_FLOAT)


def _config(level: int) -> ChunkConfig:
    # classic mode and no delta: the values are not a time series, and auto-detection costs a pass
    return ChunkConfig(compression_level=level, mode_spec=ModeSpec.classic(), delta_spec=DeltaSpec.no_op())


def pco_encode(kind: str, data: bytes | memoryview, base: bytes | memoryview | None, width: int, level: int) -> bytes:
    """Pco of ``data`` (``kind`` 'plain') or of its wrapping difference to ``base`` ('sub')."""
    if kind == "plain":
        values = np.frombuffer(data, dtype=_FLOAT[width])
    else:
        assert base is not None
        signed = _INT[width]
        with np.errstate(over="ignore"):
            values = np.frombuffer(data, dtype=signed) - np.frombuffer(base, dtype=signed)
    return bytes(standalone.simple_compress(values, _config(level)))


def pco_decode(kind: str, payload: bytes | memoryview, base: bytes | memoryview | None, width: int) -> bytes:
    """Inverse of ``pco_encode``. Raises ``ValueError`` when the payload is not what the header says."""
    try:
        values = standalone.simple_decompress(bytes(payload))
    except RuntimeError as exc:
        raise ValueError(f"pcodec: {exc}") from None
    expected = _FLOAT[width] if kind == "plain" else _INT[width]
    if values is None:  # Pco writes no element type for an empty array
        values = np.zeros(0, dtype=expected)
    if values.dtype != expected:
        raise ValueError(f"pcodec payload holds {values.dtype}, header says {np.dtype(expected)}")
    if kind == "plain":
        return bytes(values.tobytes())
    assert base is not None
    if len(base) != values.nbytes:
        raise ValueError("difference decoded against a base of the wrong size")
    with np.errstate(over="ignore"):
        return bytes((np.frombuffer(base, dtype=expected) + values).tobytes())
