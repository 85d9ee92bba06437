"""Find ckptfs mounts in ``/proc/self/mountinfo`` (mountpoint -> cache directory)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MountInfo:
    mountpoint: str
    cache_dir: str


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def ckptfs_mounts() -> list[MountInfo]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts, rparts = left.split(), right.split()
            if len(parts) < 5 or len(rparts) < 2:
                continue
            fstype, source = rparts[0], _unescape(rparts[1])
            if fstype == "fuse.ckptfs" and source.startswith("ckptfs:"):
                found.append(MountInfo(_unescape(parts[4]), source[len("ckptfs:") :]))
    return found


def mount_of(path: str) -> tuple[MountInfo, str] | None:
    """The ckptfs mount containing ``path`` and the path relative to its root ('' for the root)."""
    real = os.path.realpath(path)
    best: MountInfo | None = None
    for m in ckptfs_mounts():
        if real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/"):
            if best is None or len(m.mountpoint) > len(best.mountpoint):
                best = m
    if best is None:
        return None
    rel = os.path.relpath(real, best.mountpoint)
    return best, "" if rel == "." else rel
