"""FastCDC boundaries over a file. The inner loop of pyfastcdc's Cython build runs without the GIL.

Pure; callable from worker threads (each call makes its own FastCDC instance). The file is streamed
with ``pread`` through pyfastcdc's bounded buffer (twice the largest chunk), never ``mmap``'d: a
staging file can be truncated by a writer while it is cut, and a mapping of a shrinking file turns
that into SIGBUS for the whole daemon. A file that ends early raises ``FileChanged`` instead.
"""

from __future__ import annotations

import os

from pyfastcdc import FastCDC

from ckptfs.errors import FileChanged
from ckptfs.types import Piece


class _PositionalReader:
    """``readinto`` over ``pread`` of ``[0, size)`` of ``fd``; a short file raises ``FileChanged``."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size, self.pos = fd, size, 0

    def readinto(self, buf: memoryview) -> int:
        want = min(len(buf), self.size - self.pos)
        if want <= 0:
            return 0
        n = os.preadv(self.fd, [buf[:want]], self.pos)
        if n <= 0:
            raise FileChanged(f"file ended at {self.pos} of {self.size} bytes while being chunked")
        self.pos += n
        return n


def cdc_pieces(fd: int, file_size: int, avg_size: int) -> list[Piece]:
    """Content-defined pieces covering ``[0, file_size)`` of the open file ``fd``. Raises ``FileChanged``."""
    if file_size == 0:
        return []
    if file_size <= avg_size:
        return [Piece(0, file_size)]
    cdc = FastCDC(avg_size, min_size=avg_size // 4, max_size=avg_size * 4)
    return [Piece(c.offset, c.length) for c in cdc.cut_stream(_PositionalReader(fd, file_size))]
