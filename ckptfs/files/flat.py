"""The decoded (raw-frame) copies of ``files.flatten`` (``<cache>/flat/<ab>/<id>``) and the set of chunk
ids that have one. The set is the trio thread's; ``read`` and ``write`` are blocking and run in worker
threads."""

from __future__ import annotations

from ckptfs.cache import ChunkCache
from ckptfs.codec import decode, parse_header
from ckptfs.errors import CorruptChunk
from ckptfs.types import ChunkId


class FlatCopies:
    """The copies on disk (a ``ChunkCache`` of its own folder) and the ids that have one."""

    def __init__(self, store: ChunkCache) -> None:
        self.store = store
        self.ids: set[ChunkId] = set(store.iter_ids())
        self.reads = 0  # chunks a read decoded from their copy
        self.made = 0

    @property
    def size(self) -> int:
        return self.store.file_bytes

    def read(self, cid: ChunkId) -> bytes:
        """Worker thread: the chunk's plain bytes from its copy. Raises ``ChunkMissing`` (deleted
        meanwhile) or ``CorruptChunk`` (torn or flipped: the caller drops it)."""
        frame = self.store.get(cid)
        if parse_header(frame).base is not None:
            raise CorruptChunk(f"flat copy of chunk {cid.hex()} is a delta")
        return decode(frame, cid, None)

    def write(self, cid: ChunkId, frame: bytes) -> None:
        """Worker thread: store a copy (no fsync: a torn one is dropped when read). Raises
        ``CacheFull``."""
        self.store.put(cid, frame, replace=True, sync=False)

    def drop(self, cid: ChunkId) -> None:
        """Forget and delete one copy (an unlink; trio thread)."""
        self.ids.discard(cid)
        self.store.delete(cid)
