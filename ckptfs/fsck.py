"""Consistency check of a cache directory's metadata and chunks (``ckptfs fsck``).

Crash windows and what repairs them (see also files/ingest.py):

| window                                             | state left behind                    | repair            |
|----------------------------------------------------|--------------------------------------|-------------------|
| kill during writes / before ingest commit          | version 'staged', staging file       | mount re-ingests  |
| after chunk put, before its row is recorded        | chunk file without row (orphan)      | ``--repair``       |
| after a frame swap made a file's frame small       | stale chunk file (frame in the db)   | ``--repair``       |
| after chunk row, before the version commit         | chunk row with refcount 0            | mount collects    |
| after an unlink while the file was open            | inode with nlink 0                   | mount purges      |
| power cut before a version's durable point         | staged, no valid mark                | mount: go back *  |
| during a frame swap (repack, compaction)           | ``rebase_intents`` row               | mount settles it  |
| chunk file changed on disk (bit rot, tampering)    | frame fails checksum or id           | reported; reads EIO |

* to the file's previous durable version, or (none) into ``/lost+found``, reported here.

Runs with the daemon stopped when repairing (it takes the cache lock); a read-only check may run
while it is mounted.
"""

from __future__ import annotations

import sqlite3
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckptfs.cache import ChunkCache
from ckptfs.codec import parse_header
from ckptfs.errors import ChunkMissing, CorruptChunk
from ckptfs.files.reader import fetch_and_decode
from ckptfs.types import ChunkId


@dataclass(slots=True)
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    checked_chunks: int = 0
    checked_files: int = 0
    remote_only: int = 0  # chunks whose frame (or a base's) is only in the store: fetched when read

    @property
    def ok(self) -> bool:
        return not self.problems


def check(
    cache_dir: str | Path,
    *,
    verify_data: bool = False,
    repair: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Check the cache at ``cache_dir``. ``verify_data`` decodes every chunk and checks its hash."""
    rep = Report()
    db_path = Path(cache_dir) / "meta.db"
    if not db_path.exists():
        rep.problems.append(f"no metadata database at {db_path}")
        return rep
    mode = "rw" if repair else "ro"
    conn = sqlite3.connect(f"file:{db_path}?mode={mode}", uri=True)
    cache = ChunkCache(cache_dir, db_path=db_path, read_only=not repair)
    gone: list[ChunkId] = []
    try:
        # One snapshot of the metadata: a running daemon's commits do not show up half-way.
        conn.execute("BEGIN")
        _check_namespace(conn, rep)
        _check_versions(conn, cache_dir, rep)
        _check_chunks(conn, cache, rep, verify_data, repair, progress, gone)
        conn.execute("COMMIT")
        # Chunk files can still go after the snapshot (a running daemon collects what repack or an
        # unlink released): missing is a problem only if the row is still there now.
        for cid in gone:
            if conn.execute("SELECT 1 FROM chunks WHERE id=?", (cid,)).fetchone() is not None:
                rep.problems.append(f"chunk {cid.hex()}: file (or a base it decodes through) missing from the cache")
    finally:
        conn.close()
    return rep


def _check_namespace(conn: sqlite3.Connection, rep: Report) -> None:
    inodes = {int(r[0]): (int(r[1]), int(r[2])) for r in conn.execute("SELECT id, mode, nlink FROM inodes")}
    if 1 not in inodes or not stat.S_ISDIR(inodes[1][0]):
        rep.problems.append("root directory (inode 1) is missing")
    refs: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for parent, name, child in conn.execute("SELECT parent, name, inode FROM dirents"):
        if parent not in inodes:
            rep.problems.append(f"entry {bytes(name)!r} lives in missing directory {parent}")
        elif not stat.S_ISDIR(inodes[parent][0]):
            rep.problems.append(f"entry {bytes(name)!r} lives in non-directory inode {parent}")
        if child not in inodes:
            rep.problems.append(f"entry {bytes(name)!r} in {parent} points to missing inode {child}")
            continue
        refs[child] += 1
        if stat.S_ISDIR(inodes[child][0]):
            subdirs[parent] += 1
    for ino, (mode, nlink) in inodes.items():
        if ino == 1:
            continue
        if stat.S_ISDIR(mode):
            if refs[ino] and nlink != 2 + subdirs[ino]:
                rep.problems.append(f"directory inode {ino} has nlink {nlink}, expected {2 + subdirs[ino]}")
        elif nlink != refs[ino] and not (nlink == 0 and refs[ino] == 0):
            rep.problems.append(f"inode {ino} has nlink {nlink} but {refs[ino]} entries")
        if refs[ino] == 0 and nlink > 0:
            rep.problems.append(f"inode {ino} is unreachable")
        if nlink == 0:
            rep.warnings.append(f"inode {ino} is unlinked; the next mount purges it")
    lost = conn.execute("SELECT inode FROM dirents WHERE parent=1 AND name=?", (b"lost+found",)).fetchone()
    if lost is not None:
        for (name,) in conn.execute("SELECT name FROM dirents WHERE parent=?", (lost[0],)):
            rep.warnings.append(
                f"lost+found/{bytes(name).decode(errors='replace')}: a file that had no durable version when the"
                " power went (not a valid checkpoint; look at it, then delete it)"
            )


def _check_versions(conn: sqlite3.Connection, cache_dir: str | Path, rep: Report) -> None:
    staging = Path(cache_dir) / "staging"
    for ino, vid in conn.execute(
        "SELECT id, version FROM inodes WHERE version IS NOT NULL AND version NOT IN (SELECT id FROM versions)"
    ):
        rep.problems.append(
            f"inode {ino}: its current version {vid} does not exist (reads show its extents or nothing)"
        )
    for (vid,) in conn.execute("SELECT DISTINCT version FROM extents WHERE version NOT IN (SELECT id FROM versions)"):
        rep.problems.append(f"extents of version {vid}, which does not exist (their chunks are never released)")
    rows = conn.execute(
        "SELECT i.id, i.size, v.id, v.state, v.size, v.staging FROM inodes i JOIN versions v ON v.id = i.version"
    ).fetchall()
    for ino, isize, vid, state, vsize, sname in rows:
        rep.checked_files += 1
        if state == "staged":
            if not sname or not (staging / sname).exists():
                rep.problems.append(f"inode {ino}: staged version {vid} has no staging file")
            else:
                rep.warnings.append(f"inode {ino}: version {vid} is still staged; the next mount ingests it")
            continue
        if isize != vsize:
            rep.problems.append(f"inode {ino}: size {isize} differs from its version's size {vsize}")
        pos = 0
        for off, length in conn.execute("SELECT offset, length FROM extents WHERE version=? ORDER BY offset", (vid,)):
            if off != pos:
                rep.problems.append(f"inode {ino}: version {vid} has a gap or overlap at offset {pos}")
                break
            pos = off + length
        else:
            if pos != vsize:
                rep.problems.append(f"inode {ino}: version {vid} extents cover {pos} of {vsize} bytes")


def _check_chunks(
    conn: sqlite3.Connection,
    cache: ChunkCache,
    rep: Report,
    verify: bool,
    repair: bool,
    progress: Callable[[int, int], None] | None,
    gone: list[ChunkId],
) -> None:
    uses: Counter[bytes] = Counter()
    for sql in (
        "SELECT chunk, count(*) FROM extents GROUP BY chunk",
        "SELECT base, count(*) FROM chunks WHERE base IS NOT NULL GROUP BY base",
        "SELECT chunk, count(*) FROM slot_index GROUP BY chunk",
        "SELECT new_base, count(*) FROM rebase_intents WHERE new_base IS NOT NULL GROUP BY new_base",
    ):
        for c, n in conn.execute(sql):
            uses[bytes(c)] += int(n)
    rows = conn.execute("SELECT id, refcount, raw_len, base, remote FROM chunks").fetchall()
    bases = {bytes(r[0]): None if r[3] is None else bytes(r[3]) for r in rows}
    in_store = {bytes(r[0]) for r in rows if r[4] is not None}

    def chain_in_store(cid: bytes) -> bool:
        seen: set[bytes] = set()
        at: bytes | None = cid
        while at is not None and at not in seen:
            if at in in_store:
                return True
            seen.add(at)
            at = bases.get(at)
        return False

    known = set()
    for i, (cid_b, refcount, raw_len, _base, _remote) in enumerate(rows):
        cid = ChunkId(bytes(cid_b))
        known.add(cid)
        rep.checked_chunks += 1
        if progress:
            progress(i + 1, len(rows))
        if refcount != uses.get(cid, 0):
            rep.problems.append(
                f"chunk {cid.hex()}: refcount {refcount} but {uses.get(cid, 0)} extents, deltas and slots use it"
            )
        try:
            frame = cache.get(cid)
            hdr = parse_header(frame)
            if hdr.raw_len != raw_len:
                raise CorruptChunk(f"header says {hdr.raw_len} bytes, metadata {raw_len}")
            if verify:
                fetch_and_decode(cache, cid)
        except ChunkMissing:
            if chain_in_store(cid):
                rep.remote_only += 1  # not in the cache, but the store has it (fsck does not read the store)
            else:
                gone.append(cid)  # or a base it decodes through; decided after the snapshot
        except CorruptChunk as exc:
            rep.problems.append(f"chunk {cid.hex()}: corrupt ({exc})")
    for cid in {ChunkId(c) for c in uses} - known:
        rep.problems.append(f"chunk {cid.hex()}: referenced but has no metadata row")
    small = {ChunkId(bytes(r[0])) for r in conn.execute("SELECT chunk FROM frames")}
    for cid in small - known:
        rep.problems.append(f"chunk {cid.hex()}: small frame without a chunk row")
    if cache.root.exists():
        for cid in cache.iter_ids():
            if cid not in known or cid in small:
                why = "no metadata row" if cid not in known else "stale: the chunk's frame is in the database"
                if repair:
                    cache.delete(cid)
                    rep.repaired.append(f"removed orphan chunk file {cid.hex()} ({why})")
                else:
                    rep.warnings.append(f"orphan chunk file {cid.hex()} ({why}; --repair removes it)")
