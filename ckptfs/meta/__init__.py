"""The metadata database (SQLite, WAL). Used only from the trio thread."""

from __future__ import annotations

from ckptfs.meta.db import SCHEMA_VERSION, Database

__all__ = ["SCHEMA_VERSION", "Database"]
