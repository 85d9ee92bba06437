"""The kernel's read-ahead for the mount.

A FUSE mount gets the kernel's default read-ahead (128 KiB), and the INIT handshake caps it there
(pyfuse3 answers the kernel's offer unchanged): a sequential reader such as ``torch.load`` then costs
one read request per 128 KiB — 2300 for a 300 MB checkpoint, each a round trip through /dev/fuse, a
trio task and a chunk lookup. Raising the mount's ``read_ahead_kb`` in sysfs after the handshake makes
the kernel read ahead in requests of up to 1 MiB (its ``max_pages``): 290 for the same file. Root only.
"""

from __future__ import annotations

import os


def bdi_path(mountpoint: str) -> str:
    """The sysfs file of the mount's read-ahead (its backing device info, by the mount's device number)."""
    dev = os.stat(mountpoint).st_dev  # on a fresh mount this waits for the kernel's INIT handshake
    return f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"


def set_read_ahead(mountpoint: str, kib: int) -> str | None:
    """Blocking. Set the mount's read-ahead to ``kib`` KiB; None, or why it could not."""
    try:
        path = bdi_path(mountpoint)
        with open(path, "w") as f:
            f.write(f"{kib}\n")
    except OSError as exc:
        return f"{exc.strerror or exc}" + (" (it needs root)" if os.geteuid() != 0 else "")
    return None
