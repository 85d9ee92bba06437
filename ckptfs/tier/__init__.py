"""Tiering to the object store: the uploader, the namespace journal and the bucket's object formats."""

from __future__ import annotations

from ckptfs.tier.uploader import Uploader, UploadStats, prepare_store

__all__ = ["UploadStats", "Uploader", "prepare_store"]
