"""An in-memory object store for unit tests. Not shared between processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from ckptfs.backend.base import ObjectInfo, checked_key
from ckptfs.errors import ObjectNotFound


class MemoryStore:
    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock  # what stamps a put (tests of garbage collection move it)
        self._objects: dict[str, bytes] = {}
        self._mtimes: dict[str, int] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._objects[checked_key(key)] = bytes(data)
            self._mtimes[key] = self._clock()

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            if key not in self._objects:
                raise ObjectNotFound(key)
            data = self._objects[key]
        end = len(data) if length is None else offset + length
        return data[offset:end]

    def head(self, key: str) -> int:
        return len(self.get(key))

    def list(self, prefix: str) -> Iterator[str]:
        with self._lock:
            keys = sorted(k for k in self._objects if k.startswith(prefix))
        yield from keys

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            infos = [ObjectInfo(k, len(v), self._mtimes[k]) for k, v in self._objects.items() if k.startswith(prefix)]
        yield from sorted(infos, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)
            self._mtimes.pop(key, None)

    def create(self) -> bool:
        return False

    def check(self) -> None:
        return None
