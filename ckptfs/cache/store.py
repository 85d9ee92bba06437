"""Content-addressed chunk frames on the local cache disk: ``<cache>/chunks/<ab>/<hex id>``, or — for
frames of at most ``SMALL_FRAME`` bytes — rows of the metadata database's ``frames`` table.

A torch.save file has a zip header before every record and many small records (biases, norms,
optimizer step counters): half the pieces of a bf16 checkpoint. One file per such chunk cost a file
create, an fsync (~0.25 ms of CPU here) and a thread round trip each. A small frame is instead
written by ``files.chunks.ChunkIndex.record_stored`` in the very transaction that records its chunk
row (so it can never be an orphan, and needs no fsync of its own: the version commit that makes it
reachable is fsync'd after it, ``meta.Database.sync_wal``). ``get`` looks there first, through a
read-only connection per thread.

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
import logging
import mmap
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

from ckptfs.cache.remote import RemoteFrames
from ckptfs.errors import CacheFull, ChunkMissing
from ckptfs.fsutil import fsync_dir
from ckptfs.types import ChunkId

log = logging.getLogger(__name__)
_ALIGN = 4096
# Frames up to this size are stored in the metadata database, not in files of their own.
SMALL_FRAME = 32 * 1024


class _FrameReader(threading.local):
    """A read-only connection per thread to the metadata database, for small frames."""

    def __init__(self, db_path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)

    def get(self, cid: ChunkId) -> bytes | None:
        row = self.conn.execute("SELECT frame FROM frames WHERE chunk=?", (cid,)).fetchone()
        return None if row is None else bytes(row[0])


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
    """Immutable chunk frames, one file each, or small ones in the metadata database (``db_path``;
    None: files only). Thread-safe (no shared mutable state)."""

    def __init__(
        self,
        root: str | Path,
        min_free: int = 0,
        direct_io: bool = True,
        db_path: str | Path | None = None,
        read_only: bool = False,
        folder: str = "chunks",
    ) -> None:
        self.root = Path(root) / folder  # ``flat``: the decoded copies of ``files.flatten``
        self.min_free = min_free  # put() leaves at least this much free space for metadata
        if not read_only:  # read_only (``ckptfs fsck``): creates nothing, probes nothing
            made = not self.root.is_dir()
            for i in range(256):
                (self.root / f"{i:02x}").mkdir(mode=0o700, parents=True, exist_ok=True)
            if made:  # else a power cut could lose the folders, and with them chunks whose files were synced
                for made_in in (self.root, self.root.parent):
                    fsync_dir(made_in)
        self._direct = not read_only and direct_io and _supports_direct(self.root / "00")
        self._aligned = _AlignedBuffer()
        self._frames = None if db_path is None else _FrameReader(Path(db_path))
        self.read_only = read_only
        self._bytes_lock = threading.Lock()
        # bytes of the chunk files (not the small frames in the database); counted once, then kept up
        self.file_bytes = 0 if read_only or not self.root.exists() else _scan_bytes(self.root)
        self.recent: OrderedDict[ChunkId, float] = OrderedDict()  # reads, oldest first
        # Where a frame the cache does not hold comes from (``cache.remote``; set by the daemon when it
        # tiers to a store). None: a missing frame is ChunkMissing.
        self.remote: RemoteFrames | None = None

    @staticmethod
    def is_small(frame: bytes) -> bool:
        """Is ``frame`` stored in the metadata database (``ChunkIndex.record_stored``) instead of ``put``?"""
        return len(frame) <= SMALL_FRAME

    def check_space(self, cid: ChunkId, nbytes: int) -> None:
        """Raise ``CacheFull`` unless storing ``nbytes`` more leaves ``min_free`` on the cache disk (for a
        small frame too: the metadata database grows on the same disk)."""
        if self.min_free:
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize - nbytes < self.min_free:
                raise CacheFull(f"cache disk is nearly full; not storing chunk {cid.hex()}")

    def path(self, cid: ChunkId) -> Path:
        h = cid.hex()
        return self.root / h[:2] / h

    def put(self, cid: ChunkId, frame: bytes, replace: bool = True, sync: bool = True) -> None:
        """Store ``frame`` under ``cid`` durably (the directory entry needs ``sync_dirs``).

        Idempotent: storing an existing id again rewrites identical bytes. ``replace=False`` leaves an
        existing file alone (a frame fetched from the store must never overwrite a newer local one a
        frame swap put there meanwhile); ``sync=False`` skips the fsync (a copy of what the store holds:
        a power cut may lose it, a later read fetches it again). Raises ``CacheFull`` on ENOSPC.
        """
        final = self.path(cid)
        self.check_space(cid, len(frame))
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
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                old = _size_or_zero(final)
                os.rename(tmp, final)
                self._count(len(frame) - old)
            else:
                try:
                    os.link(tmp, final)  # atomic "create if absent"
                    self._count(len(frame))
                except FileExistsError:
                    pass
                tmp.unlink()
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"cache disk full while storing chunk {cid.hex()}") from exc
            raise

    def get_file_split(self, cid: ChunkId, head: int) -> tuple[bytes, bytes]:
        """The chunk file's first ``head`` bytes and the rest, read apart (so the rest is one buffer the
        caller may keep as it is). Files only: no small frame, no store. Raises ``ChunkMissing``."""
        try:
            fd = os.open(self.path(cid), os.O_RDONLY)
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {cid.hex()} is missing from the local cache") from None
        try:
            size = os.fstat(fd).st_size
            first = os.pread(fd, min(head, size), 0)
            rest = os.pread(fd, size - len(first), len(first)) if size > len(first) else b""
        finally:
            os.close(fd)
        return first, rest

    def get(self, cid: ChunkId) -> bytes:
        """Return the stored frame: the small one if there is one (a file left behind when a frame
        shrank is stale), else the file's, else the store's (kept as a file from then on, if there is
        room). Raises ``ChunkMissing`` if none has it."""
        small = self.small(cid)
        if small is not None:
            return small
        try:
            with open(self.path(cid), "rb") as f:
                return f.read()
        except FileNotFoundError:
            pass
        frame = None if self.remote is None else self.remote.fetch(cid)
        if frame is None:
            raise ChunkMissing(f"chunk {cid.hex()} is missing from the local cache")
        self.keep(cid, frame, replace=False)
        return frame

    def remote_frame(self, cid: ChunkId) -> bytes | None:
        """The store's copy of the chunk's frame (None: it has none). Raises ``ChunkMissing``."""
        return None if self.remote is None else self.remote.fetch(cid)

    def keep(self, cid: ChunkId, frame: bytes, replace: bool) -> None:
        """Best effort: keep a frame fetched from the store as the local file (``replace``: over a corrupt
        one). Small frames are the trio thread's to keep (``meta.tiering``). A full disk is no error."""
        if self.read_only or self.is_small(frame):
            return
        try:
            self.put(cid, frame, replace=replace, sync=False)
        except (CacheFull, OSError) as exc:
            log.debug("not keeping chunk %s fetched from the store: %s", cid.hex(), exc)

    def small(self, cid: ChunkId) -> bytes | None:
        """The chunk's small frame, if it has one (through this thread's connection)."""
        return None if self._frames is None else self._frames.get(cid)

    def holds(self, cid: ChunkId) -> bool:
        """Is a frame of ``cid`` here (a small one, or a file), so a read needs no store?"""
        return self.small(cid) is not None or self.has_file(cid)

    def has_file(self, cid: ChunkId) -> bool:
        return self.path(cid).exists()

    def size(self, cid: ChunkId) -> int:
        return self.path(cid).stat().st_size

    def delete(self, cid: ChunkId) -> None:
        """Remove a chunk file. Idempotent."""
        path = self.path(cid)
        size = _size_or_zero(path)
        try:
            path.unlink()
            self._count(-size)
        except FileNotFoundError:
            pass

    def _count(self, delta: int) -> None:
        with self._bytes_lock:
            self.file_bytes += delta

    def touch(self, cid: ChunkId) -> None:
        """A read used ``cid`` (the eviction order, ``files.evict``). Any thread."""
        with self._bytes_lock:
            self.recent[cid] = time.monotonic()
            self.recent.move_to_end(cid)
            if len(self.recent) > 1_000_000:
                self.recent.popitem(last=False)

    def sync_dirs(self, cids: Iterable[ChunkId]) -> None:
        """fsync the directories holding ``cids`` so their renames are durable."""
        for sub in sorted({cid.hex()[:2] for cid in cids}):
            fsync_dir(self.root / sub)

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


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _scan_bytes(root: Path) -> int:
    total = 0
    for sub in os.scandir(root):
        if sub.is_dir():
            for f in os.scandir(sub.path):
                if not f.name.endswith(".tmp"):
                    try:
                        total += f.stat().st_size
                    except FileNotFoundError:
                        pass
    return total


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
