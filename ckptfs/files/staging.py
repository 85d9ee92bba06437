"""Staging files: the bytes of a version that is still being written or not yet chunked.

A staging file *is* the file's content (its size is the file size), so after a crash nothing but
the file is needed to resume. Plain blocking calls; cheap metadata operations.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptfs.fsutil import fsync_dir
from ckptfs.types import VersionId


class StagingArea:
    """Staging files under ``<cache>/staging/<version id>``."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.root = Path(cache_dir) / "staging"
        if not self.root.is_dir():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(self.root.parent)  # else a power cut could lose the folder and every file in it

    def name(self, vid: VersionId) -> str:
        return str(int(vid))

    def create(self, vid: VersionId) -> int:
        """Create an empty staging file; return an O_RDWR fd."""
        return os.open(self.root / self.name(vid), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def open(self, name: str) -> int:
        """Open an existing staging file by name. Raises FileNotFoundError."""
        return os.open(self.root / name, os.O_RDWR)

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        return [p.name for p in self.root.iterdir()]

    def sync_dir(self) -> None:
        fsync_dir(self.root)
