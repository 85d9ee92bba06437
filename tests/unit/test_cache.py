"""The chunk file store: O_DIRECT and page-cache writes store the same bytes."""

from __future__ import annotations

import os

import pytest

from ckptfs.cache import ChunkCache
from ckptfs.codec import chunk_id
from ckptfs.errors import ChunkMissing


@pytest.mark.parametrize("direct", [True, False])
def test_put_get_round_trip_at_every_alignment(tmp_path, direct):
    cache = ChunkCache(tmp_path / str(direct), direct_io=direct)
    sizes = [0, 1, 4095, 4096, 4097, 5 * 1024 * 1024 + 3, 100]  # grows, then shrinks the aligned buffer's use
    frames = {size: os.urandom(size) for size in sizes}
    for frame in frames.values():
        cache.put(chunk_id(frame), frame)
    cache.sync_dirs(chunk_id(f) for f in frames.values())
    for size, frame in frames.items():
        assert cache.get(chunk_id(frame)) == frame
        assert cache.size(chunk_id(frame)) == size
    assert not list((tmp_path / str(direct)).rglob("*.tmp"))
    with pytest.raises(ChunkMissing):
        cache.get(chunk_id(b"absent"))
