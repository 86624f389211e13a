"""The gspngen cache folder, shared by every runtime that keeps files on disk."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$GSPNGEN_CACHE_DIR, else $XDG_CACHE_HOME/gspngen, else ~/.cache/gspngen (not created here)."""
    root = os.environ.get("GSPNGEN_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "gspngen") if xdg else os.path.join(Path.home(), ".cache", "gspngen")
    return Path(root)
