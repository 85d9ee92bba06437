"""A directory on a local or network filesystem as the object store (the embedded default).

Writes are atomic and durable: temp file, fsync, rename, fsync of the directory (as restic's local backend).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ckptfs.backend.base import ObjectInfo, checked_key
from ckptfs.errors import ObjectNotFound, PermanentBackendError


class LocalDirStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / checked_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def head(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def list(self, prefix: str) -> Iterator[str]:
        keys = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith("."):
                    continue
                key = os.path.relpath(os.path.join(dirpath, name), self.root)
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in self.list(prefix):
            try:
                st = (self.root / key).stat()
            except FileNotFoundError:
                continue  # deleted since it was listed
            yield ObjectInfo(key, st.st_size, st.st_mtime_ns)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def create(self) -> bool:
        made = not self.root.is_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        return made

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe.{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise PermanentBackendError(f"object store directory {self.root} is not writable: {exc.strerror}") from None
