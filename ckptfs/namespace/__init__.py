"""The namespace: inodes, directory entries, lookup counts and open file handles."""

from __future__ import annotations

from ckptfs.namespace.tree import ROOT, Attr, Handle, Tree

__all__ = ["ROOT", "Attr", "Handle", "Tree"]
