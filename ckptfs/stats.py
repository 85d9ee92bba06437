"""Space accounting from the metadata database: logical vs stored bytes, dedup and compression ratios.

Opens the database read-only, so it is safe while the daemon runs (SQLite WAL readers never block it).
"""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path

ROOT = 1


@dataclass(slots=True)
class Usage:
    """Bytes of one directory (its own files) or of a whole subtree."""

    files: int = 0
    logical: int = 0  # sum of file sizes
    staged: int = 0  # bytes still in staging files (not chunked yet)
    chunked: int = 0  # logical bytes of chunked files
    unique_raw: int = 0  # plain bytes of the distinct chunks those files use
    stored: int = 0  # encoded bytes of those distinct chunks on disk
    _seen: set[bytes] = field(default_factory=set, repr=False)

    @property
    def dedup_ratio(self) -> float:
        return self.chunked / self.unique_raw if self.unique_raw else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_raw / self.stored if self.stored else 1.0

    @property
    def stored_total(self) -> int:
        return self.stored + self.staged

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


def usage(conn: sqlite3.Connection, rel: str = "") -> tuple[Usage, dict[str, Usage]]:
    """(total of the subtree at ``rel``, per-directory usage keyed by path relative to the mount root)."""
    start = _resolve(conn, rel)
    chunk_info = {bytes(r[0]): (int(r[1]), int(r[2])) for r in conn.execute("SELECT id, raw_len, stored FROM chunks")}
    total = Usage()
    per_dir: dict[str, Usage] = {}
    stack: list[tuple[int, str]] = [(start, rel.strip("/"))]
    while stack:
        ino, path = stack.pop()
        here = per_dir.setdefault(path or ".", Usage())
        rows = conn.execute(
            "SELECT d.name, i.id, i.mode, i.size, v.id, v.state FROM dirents d JOIN inodes i ON i.id = d.inode"
            " LEFT JOIN versions v ON v.id = i.version WHERE d.parent=?",
            (ino,),
        ).fetchall()
        for name, child, mode, size, vid, state in rows:
            child_path = f"{path}/{name.decode(errors='replace')}" if path else name.decode(errors="replace")
            if stat.S_ISDIR(mode):
                stack.append((child, child_path))
                continue
            if not stat.S_ISREG(mode):
                continue
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
                raw, stored = chunk_info.get(cid, (0, 0))
                for u in (here, total):
                    if cid not in u._seen:
                        u._seen.add(cid)
                        u.unique_raw += raw
                        u.stored += stored
    return total, per_dir
