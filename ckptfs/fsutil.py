"""Small file-system helpers every layer uses (stdlib only)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` durable (a created, renamed or deleted name survives a power
    cut only once its directory is fsync'd). Blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
