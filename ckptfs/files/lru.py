"""A byte-bounded LRU of chunk bytes by chunk id. Trio thread only; threads receive bytes, never the LRU."""

from __future__ import annotations

from collections import OrderedDict

from ckptfs.types import ChunkId


class BytesLRU:
    """Keeps at most ``capacity`` bytes, evicting the least recently used first.

    ``keep_last``: always keep the newest entry even if it alone exceeds the capacity (a read must not
    re-decode the chunk it is in the middle of); otherwise an entry larger than the capacity is not kept.
    """

    def __init__(self, capacity: int, keep_last: bool) -> None:
        self.capacity = capacity
        self.keep_last = keep_last
        self._data: OrderedDict[ChunkId, bytes] = OrderedDict()
        self._size = 0
        self.peak = 0  # the most bytes held at once, after evictions (``ckptfs status``)

    @property
    def size(self) -> int:
        return self._size

    def get(self, cid: ChunkId) -> bytes | None:
        data = self._data.get(cid)
        if data is not None:
            self._data.move_to_end(cid)
        return data

    def demote(self, cid: ChunkId) -> None:
        """Make ``cid`` the first to be evicted."""
        if cid in self._data:
            self._data.move_to_end(cid, last=False)

    def pop(self, cid: ChunkId) -> None:
        old = self._data.pop(cid, None)
        if old is not None:
            self._size -= len(old)

    def put(self, cid: ChunkId, data: bytes) -> None:
        if not self.keep_last and len(data) > self.capacity:
            return
        self.pop(cid)
        self._data[cid] = data
        self._size += len(data)
        while self._size > self.capacity and len(self._data) > (1 if self.keep_last else 0):
            _, dropped = self._data.popitem(last=False)
            self._size -= len(dropped)
        self.peak = max(self.peak, self._size)
