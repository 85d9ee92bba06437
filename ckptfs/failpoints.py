"""Named fault-injection points, off unless ``CKPTFS_FAILPOINTS`` names them (for tests; etcd's gofail and
TiKV's fail-rs are the model).

``CKPTFS_FAILPOINTS=ingest,handler:mkdir`` makes ``hit("ingest")`` and ``hit("handler:mkdir")`` raise
``InjectedFault`` — an exception no code path expects, standing in for a bug. The names in use: ``ingest``,
``repack``, ``compact``, ``sweep``, ``marker``, ``reclaim`` (one unit of work of that background job) and
``handler:<name>`` (that FUSE handler). Read once per process.
"""

from __future__ import annotations

import os
from functools import cache


class InjectedFault(RuntimeError):
    """Raised at an enabled failpoint."""


@cache
def _enabled() -> frozenset[str]:
    return frozenset(n.strip() for n in os.environ.get("CKPTFS_FAILPOINTS", "").split(",") if n.strip())


def hit(name: str) -> None:
    """Raise ``InjectedFault`` if failpoint ``name`` is enabled. Cheap when none is."""
    if name in _enabled():
        raise InjectedFault(f"failpoint {name}")
