"""The metadata database (SQLite, WAL) and the repository of file versions. Used only from the trio thread."""

from __future__ import annotations

from ckptfs.meta.db import SCHEMA_VERSION, Database
from ckptfs.meta.versions import VersionRow, Versions, add_refs, drop_refs

__all__ = ["SCHEMA_VERSION", "Database", "VersionRow", "Versions", "add_refs", "drop_refs"]
