"""Content-defined chunking (FastCDC) for files whose format ckptfs does not parse."""

from __future__ import annotations

from ckptfs.chunker.cdc import cdc_pieces

__all__ = ["cdc_pieces"]
