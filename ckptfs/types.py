"""Small value types shared by every layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

ChunkId = NewType("ChunkId", bytes)
"""xxh3-128 digest (16 bytes) of a chunk's plain bytes."""

VersionId = NewType("VersionId", int)
InodeId = NewType("InodeId", int)


class VersionState(enum.StrEnum):
    """Durability state of a file version (see docs/architecture.md)."""

    STAGED = "staged"  # bytes live in a staging file on the cache disk
    LOCAL = "local"  # chunked, encoded and committed in the local chunk cache
    REMOTE = "remote"  # every chunk and a journal segment naming the version are in the object store


@dataclass(frozen=True, slots=True)
class Piece:
    """A planned chunk of a file: ``length`` bytes at ``offset``.

    ``slot`` names the piece's place in the file's logical layout (``"data/3#0"`` for a torch record,
    a tensor name for safetensors) so a later version can find its counterpart; ``None`` for
    content-defined chunks. ``elem_width`` is the element size in bytes when known (0 = unknown).
    """

    offset: int
    length: int
    slot: str | None = None
    elem_width: int = 0


def chunk_hex(chunk: ChunkId) -> str:
    """Hex spelling of a chunk id, as used in file names and logs."""
    return chunk.hex()
