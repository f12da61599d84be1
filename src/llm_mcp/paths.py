"""What a name an agent passed is on this machine's file system, without raising for names no path can be, and
which base model a LoRA adapter folder names. No torch: the server's sandbox and the workers both read it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Literal

from llm_mcp.errors import InvalidArgument


def stat_kind(path: Path) -> Literal["dir", "file", "other"] | None:
    """'dir', 'file' (regular) or 'other' for what is at path (symbolic links followed); None when nothing is, or
    when the name cannot be looked up at all (one too long for the file system, a symlink loop): a dataset or model
    name is then a hub id, not a local path."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def adapter_base(folder: Path) -> str | None:
    """The base model an adapter folder names, or None when the folder is not a LoRA adapter."""
    if stat_kind(folder / "adapter_config.json") != "file" or stat_kind(folder / "config.json") == "file":
        return None
    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not isinstance(base, str) or not base.strip():
        raise InvalidArgument("model_name", str(folder), "an adapter folder whose adapter_config.json names its base "
                                                         "model in base_model_name_or_path")
    return base
