"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from ckptfs.cache import ChunkCache
from ckptfs.files.chunks import ChunkIndex
from ckptfs.meta import Database


@pytest.fixture
def index(tmp_path):
    """A chunk index over a fresh metadata database and chunk cache, wired as the daemon wires them."""
    db = Database(tmp_path / "meta.db")
    chunks = ChunkIndex(db, ChunkCache(tmp_path, db_path=db.path))
    yield chunks
    db.conn.close()
