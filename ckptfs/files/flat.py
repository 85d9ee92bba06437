"""The decoded (raw-frame) copies of ``files.flatten`` (``<cache>/flat/<ab>/<id>``) and the set of chunk
ids that have one. The set is the trio thread's; ``read`` and ``write`` are blocking and run in worker
threads."""

from __future__ import annotations

from ckptfs.cache import ChunkCache
from ckptfs.codec import HEADER_SIZE, decode_raw_split
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
        meanwhile) or ``CorruptChunk`` (torn or flipped: the caller drops it). The header and the
        payload are read apart, so the payload is returned without a copy (a tenth of a restore's
        daemon CPU was that copy, into memory the host had to back first)."""
        header, payload = self.store.get_file_split(cid, HEADER_SIZE)
        return decode_raw_split(header, payload, cid)

    def write(self, cid: ChunkId, frame: bytes) -> None:
        """Worker thread: store a copy (no fsync: a torn one is dropped when read). Raises
        ``CacheFull``."""
        self.store.put(cid, frame, replace=True, sync=False)

    def drop(self, cid: ChunkId) -> None:
        """Forget and delete one copy (an unlink; trio thread)."""
        self.ids.discard(cid)
        self.store.delete(cid)
