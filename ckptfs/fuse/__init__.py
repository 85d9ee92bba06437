"""The kernel adapter: pyfuse3 handlers that forward to the namespace and map errors to errnos."""

from __future__ import annotations

from ckptfs.fuse.ops import Operations, direct_writes_supported

__all__ = ["Operations", "direct_writes_supported"]
