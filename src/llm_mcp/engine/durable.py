"""Writes that a crash or a power loss leaves either undone or done, never half-done: fsync files and folders, write
a small file under a temporary name and rename it, move a finished folder into place with one rename.

Libraries (`save_pretrained`, `torch.save`) write in place and fsync nothing; what they write becomes durable here.
No torch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def fsync_file(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (files created, renamed or removed in it) durable."""
    fsync_file(folder)


def fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def write_json(path: Path, data: Any) -> None:
    """`path` holds `data` in full or is as it was: written beside it, fsynced, renamed over it, folder fsynced."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` over `final`: an empty folder is removed first, a folder of earlier results
    (the caller decided it may be replaced) is moved aside and deleted once the new one is in place."""
    old = None
    if final.is_dir():
        if any(final.iterdir()):
            old = final.parent / f"{final.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        else:
            final.rmdir()
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
