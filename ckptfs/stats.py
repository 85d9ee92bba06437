"""Space accounting from the metadata database: logical vs stored bytes, dedup and compression ratios.

Opens the database read-only, so it is safe while the daemon runs (SQLite WAL readers never block it).
"""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ckptfs.codec import Codec

ROOT = 1
DELTA_CODECS = {int(Codec.DELTA_GROUPED_ZSTD), int(Codec.SUB_GROUPED_ZSTD), int(Codec.SUB_PCO)}
CODEC_NAMES = {
    int(Codec.RAW): "raw",
    int(Codec.ZSTD): "zstd",
    int(Codec.GROUPED_ZSTD): "grouped",
    int(Codec.DELTA_GROUPED_ZSTD): "delta-xor",
    int(Codec.SUB_GROUPED_ZSTD): "delta-sub",
    int(Codec.PCO): "pco",
    int(Codec.SUB_PCO): "delta-pco",
}


@dataclass(slots=True)
class Usage:
    """Bytes of one directory (its own files) or of a whole subtree."""

    files: int = 0
    logical: int = 0  # sum of file sizes
    staged: int = 0  # bytes still in staging files (not chunked yet)
    chunked: int = 0  # logical bytes of chunked files
    unique_raw: int = 0  # plain bytes of the distinct chunks those files use
    stored: int = 0  # encoded bytes of those distinct chunks on disk
    delta_raw: int = 0  # plain bytes of the distinct delta-coded chunks among them
    delta_stored: int = 0  # their encoded bytes
    base_only: int = 0  # encoded bytes of chunks kept only as delta bases (whole filesystem only)
    _seen: set[bytes] = field(default_factory=set, repr=False)

    @property
    def saved_by_dedup(self) -> int:
        return self.chunked - self.unique_raw

    @property
    def saved_by_delta(self) -> int:
        return self.delta_raw - self.delta_stored

    @property
    def saved_by_compression(self) -> int:
        return (self.unique_raw - self.delta_raw) - (self.stored - self.delta_stored)

    @property
    def dedup_ratio(self) -> float:
        return self.chunked / self.unique_raw if self.unique_raw else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_raw / self.stored if self.stored else 1.0

    @property
    def stored_total(self) -> int:
        return self.stored + self.staged + self.base_only

    @property
    def ratio(self) -> float:
        return self.logical / self.stored_total if self.stored_total else 1.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "files": self.files,
            "logical_bytes": self.logical,
            "stored_bytes": self.stored_total,
            "staged_bytes": self.staged,
            "chunk_bytes": self.stored,
            "unique_chunk_raw_bytes": self.unique_raw,
            "dedup_ratio": round(self.dedup_ratio, 4),
            "compression_ratio": round(self.compression_ratio, 4),
            "ratio": round(self.ratio, 4),
        }


def open_readonly(db_path: str | Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)


def _resolve(conn: sqlite3.Connection, rel: str) -> int:
    ino = ROOT
    for part in [p for p in rel.split("/") if p]:
        row = conn.execute("SELECT inode FROM dirents WHERE parent=? AND name=?", (ino, part.encode())).fetchone()
        if row is None:
            raise FileNotFoundError(rel)
        ino = int(row[0])
    return ino


@dataclass(frozen=True, slots=True)
class _File:
    path: str
    inode: int
    size: int
    version: int | None
    state: str | None


def _walk(conn: sqlite3.Connection, start: int, rel: str) -> Iterator[tuple[str, list[_File]]]:
    """Every directory of the subtree at ``start`` (its path relative to the mount root) with its regular files;
    for a regular file ``start``, its directory with just that file."""
    row = conn.execute(
        "SELECT i.mode, i.size, v.id, v.state FROM inodes i LEFT JOIN versions v ON v.id = i.version WHERE i.id=?",
        (start,),
    ).fetchone()
    if row is not None and stat.S_ISREG(row[0]):
        parent = rel.strip("/").rpartition("/")[0]
        yield parent, [_File(rel.strip("/"), start, row[1], row[2], row[3])]
        return
    stack: list[tuple[int, str]] = [(start, rel.strip("/"))]
    while stack:
        ino, path = stack.pop()
        files = []
        rows = conn.execute(
            "SELECT d.name, i.id, i.mode, i.size, v.id, v.state FROM dirents d JOIN inodes i ON i.id = d.inode"
            " LEFT JOIN versions v ON v.id = i.version WHERE d.parent=?",
            (ino,),
        ).fetchall()
        for name, child, mode, size, vid, state in rows:
            child_path = f"{path}/{name.decode(errors='replace')}" if path else name.decode(errors="replace")
            if stat.S_ISDIR(mode):
                stack.append((child, child_path))
            elif stat.S_ISREG(mode):
                files.append(_File(child_path, child, size, vid, state))
        yield path, files


def usage(conn: sqlite3.Connection, rel: str = "") -> tuple[Usage, dict[str, Usage]]:
    """(total of the subtree at ``rel``, per-directory usage keyed by path relative to the mount root)."""
    start = _resolve(conn, rel)
    chunk_info = {
        bytes(r[0]): (int(r[1]), int(r[2]), int(r[3]))
        for r in conn.execute("SELECT id, raw_len, stored, codec FROM chunks")
    }
    total = Usage()
    per_dir: dict[str, Usage] = {}
    for path, files in _walk(conn, start, rel):
        here = per_dir.setdefault(path or ".", Usage())
        for f in files:
            size, vid, state = f.size, f.version, f.state
            for u in (here, total):
                u.files += 1
                u.logical += size
            if vid is None:
                continue
            if state == "staged":
                for u in (here, total):
                    u.staged += size
                continue
            for u in (here, total):
                u.chunked += size
            for (cid,) in conn.execute("SELECT DISTINCT chunk FROM extents WHERE version=?", (vid,)):
                cid = bytes(cid)
                raw, stored, codec = chunk_info.get(cid, (0, 0, 0))
                for u in (here, total):
                    if cid not in u._seen:
                        u._seen.add(cid)
                        u.unique_raw += raw
                        u.stored += stored
                        if codec in DELTA_CODECS:
                            u.delta_raw += raw
                            u.delta_stored += stored
    if start == ROOT:
        total.base_only = sum(v[1] for k, v in chunk_info.items() if k not in total._seen)
    return total, per_dir


@dataclass(slots=True)
class VersionInfo:
    path: str
    version: int | None
    state: str
    size: int
    layout: str | None = None
    base_version: int | None = None
    base_path: str | None = None  # where the base version's file is now (None when deleted)
    codecs: dict[str, int] = field(default_factory=dict)  # chunks per codec
    stored: int = 0  # encoded bytes of the version's distinct chunks
    max_depth: int = 0  # the deepest delta chain among its chunks (decodes per chunk - 1)


def versions(conn: sqlite3.Connection, rel: str = "") -> list[VersionInfo]:
    """Every file under ``rel`` (or the file itself) with its version, state, base and codec mix."""
    start = _resolve(conn, rel)
    names = {int(c): bytes(n).decode(errors="replace") for c, n in conn.execute("SELECT inode, name FROM dirents")}
    parents = {int(c): int(p) for c, p in conn.execute("SELECT inode, parent FROM dirents")}

    def path_of(ino: int) -> str:  # for delta bases, which may live anywhere
        parts = []
        while ino != ROOT and ino in names:
            parts.append(names[ino])
            ino = parents[ino]
        return "/".join(reversed(parts))

    targets = [(f.path, f.inode) for _, files in _walk(conn, start, rel) for f in files]
    out: list[VersionInfo] = []
    for path, ino in sorted(targets):
        v = conn.execute(
            "SELECT v.id, v.state, v.size, v.layout, v.base_version, v.base_inode FROM inodes i"
            " JOIN versions v ON v.id = i.version WHERE i.id=?",
            (ino,),
        ).fetchone()
        if v is None:
            out.append(VersionInfo(path, None, "empty", 0))
            continue
        mix = {
            CODEC_NAMES.get(int(codec), str(codec)): int(n)
            for codec, n in conn.execute(
                "SELECT c.codec, count(*) FROM extents e JOIN chunks c ON c.id = e.chunk WHERE e.version=?"
                " GROUP BY c.codec",
                (v[0],),
            )
        }
        stored = conn.execute(
            "SELECT coalesce(sum(stored), 0) FROM chunks WHERE id IN (SELECT chunk FROM extents WHERE version=?)",
            (v[0],),
        ).fetchone()[0]
        depth = conn.execute(
            "SELECT coalesce(max(depth), 0) FROM chunks WHERE id IN (SELECT chunk FROM extents WHERE version=?)",
            (v[0],),
        ).fetchone()[0]
        base_path = path_of(v[5]) if v[5] is not None and v[5] in names else None
        out.append(VersionInfo(path, v[0], v[1], v[2], v[3], v[4], base_path, mix, int(stored), int(depth)))
    return out
