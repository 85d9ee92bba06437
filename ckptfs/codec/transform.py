"""Byte grouping ("byte planes"): element byte k of every element stored together.

Float tensors compress far better this way: exponent bytes are alike across elements, mantissa
low bytes are noise. Pure numpy; releases the GIL for large copies.
"""

from __future__ import annotations

import numpy as np


def group_bytes(data: bytes | memoryview, width: int) -> bytes:
    """Return the ``width`` byte planes of ``data`` concatenated. ``len(data)`` must be a multiple of width."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return arr.reshape(-1, width).T.tobytes()


def ungroup_bytes(data: bytes | memoryview, width: int) -> bytes:
    """Inverse of ``group_bytes``."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return arr.reshape(width, -1).T.tobytes()
