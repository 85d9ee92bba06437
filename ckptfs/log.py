"""Logging setup for the daemon and the CLI."""

from __future__ import annotations

import logging
import os
import sys


def setup(level: int = logging.INFO, logfile: str | None = None, debug_modules: list[str] | None = None) -> None:
    """Configure the root logger. Under systemd (``JOURNAL_STREAM``) log to stderr without timestamps."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if logfile is not None:
        handler = logging.FileHandler(logfile)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if "JOURNAL_STREAM" in os.environ and logfile is None:
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    for name in debug_modules or []:
        logging.getLogger(name).setLevel(logging.DEBUG)
