"""Free space, and a full disk told apart from other failures. Leaf module (no torch): the server's job store, the
worker's checkpoints and the exports all use it, so ENOSPC anywhere becomes the same `DiskFull` error naming the
folder, the bytes needed and the bytes free."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_mcp.errors import DiskFull

# Some writers report ENOSPC only in their own words: SQLite ("database or disk is full"), safetensors and the C
# library ("No space left on device"). torch's zip writer says only that a write fell short ("unexpected pos",
# "file write failed"): that counts as a full disk only where the folder's file system is nearly full.
_FULL_MESSAGES = ("no space left on device", "database or disk is full", "disk quota exceeded")
_SHORT_WRITE_MESSAGES = ("file write failed", "unexpected pos")
_NEARLY_FULL_BYTES = 64 * 1024 * 1024
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
MARGIN_BYTES = 16 * 1024 * 1024  # room left beside what a write needs: logs, the job store, temporary files


def free_bytes(folder: str | Path) -> int | None:
    """Bytes free to an unprivileged writer on the file system holding `folder` (its nearest existing parent), or
    None when that cannot be read."""
    path = Path(folder).expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def require_free(folder: str | Path, needed: int, *, doing: str) -> None:
    """Raise DiskFull before starting a write of ~`needed` bytes into `folder` that would not fit (with a margin)."""
    free = free_bytes(folder)
    if free is not None and free < needed + MARGIN_BYTES:
        raise DiskFull(folder, needed=needed + MARGIN_BYTES, free=free, doing=doing)


def is_disk_full(exc: BaseException | None, folder: str | Path | None = None) -> bool:
    """Whether an exception, or one it was raised from, is a full disk (or a quota) in whatever words. A short
    write without a reason counts only when `folder` is given and its file system is nearly full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS):
            return True
        if any(m in text for m in _FULL_MESSAGES):
            return True
        if folder is not None and any(m in text for m in _SHORT_WRITE_MESSAGES):
            free = free_bytes(folder)
            return free is not None and free < _NEARLY_FULL_BYTES
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def disk_full_as_error(folder: str | Path, *, doing: str, needed: int | None = None) -> Iterator[None]:
    """Re-raise a full disk inside the block as DiskFull naming `folder`; other errors pass unchanged."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not is_disk_full(exc, folder):
            raise
        raise DiskFull(folder, needed=needed, free=free_bytes(folder), doing=doing) from exc
