"""File contents: staging files, the background ingest pipeline, and reads of committed versions."""

from __future__ import annotations

from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.contents import Active, FileContents
from ckptfs.files.ingest import Ingester
from ckptfs.files.reader import ChunkReader
from ckptfs.files.staging import StagingArea
from ckptfs.files.workers import Workers

__all__ = ["Active", "ChunkIndex", "ChunkReader", "FileContents", "Ingester", "StagingArea", "Workers"]
