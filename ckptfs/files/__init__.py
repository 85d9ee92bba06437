"""File contents: staging files, the background ingest pipeline, and reads of committed versions."""

from __future__ import annotations

from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.contents import FileContents
from ckptfs.files.durable import Active, DurableMarker
from ckptfs.files.evict import Evictor
from ckptfs.files.ingest import Ingester
from ckptfs.files.reader import ChunkReader
from ckptfs.files.reclaim import Reclaimer
from ckptfs.files.staging import StagingArea
from ckptfs.files.workers import Workers

__all__ = [
    "Active",
    "ChunkIndex",
    "ChunkReader",
    "DurableMarker",
    "Evictor",
    "FileContents",
    "Ingester",
    "Reclaimer",
    "StagingArea",
    "Workers",
]
