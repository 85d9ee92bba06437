"""FastCDC boundaries over a file. The inner loop of pyfastcdc's Cython build runs without the GIL.

Pure; callable from worker threads (each call makes its own FastCDC instance).
"""

from __future__ import annotations

import mmap

from pyfastcdc import FastCDC

from ckptfs.types import Piece


def cdc_pieces(fd: int, file_size: int, avg_size: int) -> list[Piece]:
    """Content-defined pieces covering ``[0, file_size)`` of the open file ``fd``."""
    if file_size == 0:
        return []
    if file_size <= avg_size:
        return [Piece(0, file_size)]
    cdc = FastCDC(avg_size, min_size=avg_size // 4, max_size=avg_size * 4)
    with mmap.mmap(fd, file_size, prot=mmap.PROT_READ) as mm:
        view = memoryview(mm)
        try:
            return [Piece(c.offset, c.length) for c in cdc.cut_buf(view)]
        finally:
            view.release()
