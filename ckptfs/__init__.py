"""ckptfs: a FUSE filesystem for machine-learning checkpoints."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
