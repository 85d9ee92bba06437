"""The ``ckptfs`` command line."""

from __future__ import annotations

from ckptfs.cli.main import main

__all__ = ["main"]
