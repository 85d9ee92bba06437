"""Turn a file's tensor records into chunk pieces whose boundaries follow the records, not offsets.

Offsets move between checkpoints of one model (the pickle grows, the archive folder is the file
stem), so a piece is named by its *slot* — record name and piece index — and cut from the record's
own start. Small records and the bytes between records (zip headers, the pickle, a JSON header) are
packed into "filler" pieces named after the record before them. Pure; callable from any thread.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ckptfs.types import Piece

# Records smaller than this are packed with their neighbours instead of getting their own pieces.
MIN_RECORD = 256 * 1024


@dataclass(frozen=True, slots=True)
class Record:
    """A tensor payload inside a file: ``length`` bytes at ``offset``; ``width`` = element bytes (0 unknown)."""

    name: str
    offset: int
    length: int
    width: int = 0


def cut(start: int, end: int, piece: int, slot: str, width: int = 0) -> list[Piece]:
    """Fixed pieces of ``[start, end)`` named ``slot#0``, ``slot#1``, ..."""
    out = []
    i = 0
    for off in range(start, end, piece):
        out.append(Piece(off, min(piece, end - off), f"{slot}#{i}", width))
        i += 1
    return out


def plan_records(records: list[Record], file_size: int, piece_size: int) -> list[Piece]:
    """Cover ``[0, file_size)`` with pieces: big records cut from their own start, the rest as filler.

    Raises ``ValueError`` if records overlap or run past the end of the file.
    """
    pieces: list[Piece] = []
    cursor = 0
    prev = "~head"
    last_end = 0
    for rec in sorted(records, key=lambda r: r.offset):
        if rec.offset < last_end or rec.offset + rec.length > file_size:
            raise ValueError(f"record {rec.name} overlaps another or runs past the end")
        last_end = rec.offset + rec.length
        if rec.length < MIN_RECORD:
            continue
        if rec.offset > cursor:
            pieces += cut(cursor, rec.offset, piece_size, f"~after:{prev}", 0)
        pieces += cut(rec.offset, rec.offset + rec.length, piece_size, rec.name, rec.width)
        cursor = rec.offset + rec.length
        prev = rec.name
    if file_size > cursor:
        pieces += cut(cursor, file_size, piece_size, f"~after:{prev}", 0)
    return pieces


def signature(kind: str, records: list[Record]) -> str:
    """A layout signature: files with equal signatures have the same records (names, sizes, widths)."""
    h = hashlib.sha256(kind.encode())
    for rec in sorted(records, key=lambda r: r.name):
        h.update(f"\0{rec.name}\0{rec.length}\0{rec.width}".encode())
    return f"{kind}:{h.hexdigest()[:32]}"
