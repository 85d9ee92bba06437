"""Content-addressed chunk files on the local cache disk: ``<cache>/chunks/<ab>/<hex id>``.

Protocol (who does what, and the crash windows):

* Every method here is blocking file I/O and is called from worker threads through
  ``trio.to_thread.run_sync``; none touches shared in-memory state, so they are safe to run
  concurrently. The metadata about chunks (refcounts, sizes) lives in SQLite and is only touched
  from the trio thread (``files.ingest`` / ``files.chunks``).
* ``put`` writes ``tmp`` -> ``fsync`` -> ``rename``. A crash leaves either no file or a complete
  one; stray ``*.tmp`` files are removed by ``sweep_tmp`` at start-up.
* ``put`` writes with ``O_DIRECT`` where the file system supports it (a page-aligned copy padded to
  4 KiB, then truncated to the frame's length). Copying a checkpoint's frames into the page cache
  took ~12 % of ingest CPU, and ingest keeps the plain bytes it needs again (delta bases) in memory.
  On file systems without ``O_DIRECT`` (tmpfs) it writes through the page cache.
* ``sync_dirs`` fsyncs the directories touched by a batch of puts; ingest calls it before the
  metadata commit that makes a version ``local``. So a committed version never refers to a chunk
  that is not durable.
* A chunk file whose metadata row never committed (crash between rename and commit) is an orphan:
  harmless, reported and removed by ``ckptfs fsck --repair``.
* Files are immutable once renamed into place; ``delete`` is only called for chunks whose
  refcount dropped to zero and that no ingest job has pinned.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from ckptfs.errors import CacheFull, NotFound
from ckptfs.types import ChunkId

_ALIGN = 4096


class _AlignedBuffer(threading.local):
    """A page-aligned buffer per thread for O_DIRECT writes."""

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, _ALIGN)

    def holding(self, frame: bytes) -> memoryview:
        """``frame`` copied into the buffer and zero-padded to a multiple of 4 KiB."""
        padded = -(-len(frame) // _ALIGN) * _ALIGN or _ALIGN
        if len(self.buf) < padded:
            self.buf.close()
            self.buf = mmap.mmap(-1, padded)
        self.buf[: len(frame)] = frame
        self.buf[len(frame) : padded] = bytes(padded - len(frame))
        return memoryview(self.buf)[:padded]


class ChunkCache:
    """Immutable chunk frames stored one file each. Thread-safe (no shared mutable state)."""

    def __init__(self, root: str | Path, min_free: int = 0, direct_io: bool = True) -> None:
        self.root = Path(root) / "chunks"
        self.min_free = min_free  # put() leaves at least this much free space for metadata
        for i in range(256):
            (self.root / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        self._direct = direct_io and _supports_direct(self.root / "00")
        self._aligned = _AlignedBuffer()

    def path(self, cid: ChunkId) -> Path:
        h = cid.hex()
        return self.root / h[:2] / h

    def put(self, cid: ChunkId, frame: bytes) -> None:
        """Store ``frame`` under ``cid`` durably (the directory entry needs ``sync_dirs``).

        Idempotent: storing an existing id again rewrites identical bytes. Raises ``CacheFull`` on ENOSPC.
        """
        final = self.path(cid)
        if self.min_free:
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize - len(frame) < self.min_free:
                raise CacheFull(f"cache disk is nearly full; not storing chunk {cid.hex()}")
        tmp = final.with_name(final.name + f".{os.getpid()}.{id(frame):x}.tmp")
        try:
            direct = self._direct
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o600)
            try:
                if direct:
                    _write_all(fd, self._aligned.holding(frame))
                    os.ftruncate(fd, len(frame))
                else:
                    _write_all(fd, memoryview(frame))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"cache disk full while storing chunk {cid.hex()}") from exc
            raise

    def get(self, cid: ChunkId) -> bytes:
        """Return the stored frame. Raises ``NotFound`` if absent."""
        try:
            with open(self.path(cid), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"chunk {cid.hex()} is not in the local cache") from None

    def exists(self, cid: ChunkId) -> bool:
        return self.path(cid).exists()

    def size(self, cid: ChunkId) -> int:
        return self.path(cid).stat().st_size

    def delete(self, cid: ChunkId) -> None:
        """Remove a chunk file. Idempotent."""
        self.path(cid).unlink(missing_ok=True)

    def sync_dirs(self, cids: Iterable[ChunkId]) -> None:
        """fsync the directories holding ``cids`` so their renames are durable."""
        for sub in sorted({cid.hex()[:2] for cid in cids}):
            fd = os.open(self.root / sub, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def sweep_tmp(self) -> int:
        """Remove leftover ``*.tmp`` files of interrupted puts; returns how many."""
        n = 0
        for sub in self.root.iterdir():
            for p in sub.glob("*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def iter_ids(self) -> Iterator[ChunkId]:
        """Every chunk id with a file in the cache (for fsck)."""
        for sub in sorted(self.root.iterdir()):
            for p in sub.iterdir():
                if len(p.name) == 32 and not p.name.endswith(".tmp"):
                    try:
                        yield ChunkId(bytes.fromhex(p.name))
                    except ValueError:
                        continue


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _supports_direct(folder: Path) -> bool:
    """Can files in ``folder`` be written with O_DIRECT (4 KiB aligned)?"""
    probe = folder / f"direct-probe.{os.getpid()}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.write(fd, _AlignedBuffer().holding(b""))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
