"""What a name an agent passed is on this machine's file system, without raising for names no path can be."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal


def stat_kind(path: Path) -> Literal["dir", "file", "other"] | None:
    """'dir', 'file' (regular) or 'other' for what is at path (symbolic links followed); None when nothing is, or
    when the name cannot be looked up at all (one too long for the file system, a symlink loop): a dataset or model
    name is then a hub id, not a local path."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"
