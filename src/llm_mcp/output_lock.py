"""One writer per output folder: a training or an export holds `<parent>/.<name>.llm-mcp.lock` for its whole run.

The lock lives beside the folder, not inside it, so replacing the folder (an export's rename into place,
overwrite_output_dir) never removes a live lock. The holder keeps an flock on the file: the kernel drops it when the
holder's process ends, however it ends, so a lock nobody flocks is stale and is taken over. The JSON inside (holder,
pid, host, time) is what a refusal names. Leaf module (no torch): the server may ask before it starts a job.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llm_mcp.errors import OutputDirBusy

LOCK_SUFFIX = ".llm-mcp.lock"
_YOUNG_S = 10.0  # an unreadable lock this new may still be being written (file systems without hard links)
_ATTEMPTS = 5  # claims raced by another claimer are retried this often before giving up


@dataclass(frozen=True)
class LockHolder:
    """Who holds a folder, as its lock file says."""

    holder: str
    pid: int | None
    host: str | None
    since: float | None
    lock_file: Path

    def describe(self) -> str:
        where = f"pid {self.pid} on {self.host}" if self.pid is not None else "an unknown process"
        when = time.strftime(", since %Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since)) if self.since else ""
        return f"{self.holder} ({where}{when})"


def lock_path(folder: str | Path) -> Path:
    """The lock file of `folder`: a hidden sibling, named after it."""
    path = _canonical(folder)
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


def live_holder(folder: str | Path) -> tuple[Path, LockHolder] | None:
    """The folder (`folder` itself or one containing it) that a live run holds, and who holds it; None if free."""
    path = _canonical(folder)
    for candidate in (path, *path.parents):
        holder = _live_holder_of(candidate)
        if holder is not None:
            return candidate, holder
    return None


def refuse_if_held(folder: str | Path, *, doing: str) -> None:
    """Raise OutputDirBusy when a live run holds `folder` or a folder containing it (the server's early check)."""
    held = live_holder(folder)
    if held is not None:
        raise _busy(_canonical(folder), held[0], held[1], doing)


@contextmanager
def claim(folder: str | Path, holder: str, *, doing: str) -> Iterator[Path]:
    """Hold `folder` for the block: refused with OutputDirBusy while another live run holds it (or a folder
    containing it); released at the end of the block whatever happens. Yields the lock file."""
    path = _canonical(folder)
    for outer in path.parents:  # writing inside a folder another run writes is as unsafe as sharing it
        other = _live_holder_of(outer)
        if other is not None:
            raise _busy(path, outer, other, doing)
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, path, holder, doing)
    try:
        yield lock
    finally:
        _release(lock, fd)


def _canonical(folder: str | Path) -> Path:
    """One name per folder, so two spellings of it (relative, symlinked) share one lock."""
    return Path(folder).expanduser().resolve()


def _acquire(lock: Path, folder: Path, holder: str, doing: str) -> int:
    """An fd holding the flock of a lock file that names us: a new one, or a stale one taken over."""
    record = {"holder": holder, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "folder": str(folder)}
    for _ in range(_ATTEMPTS):
        fd = _create(lock, record)
        if fd is not None:
            return fd
        fd = _take_over(lock, record, folder, doing)
        if fd is not None:
            return fd
    raise OutputDirBusy(f"output_dir {str(folder)!r}: could not claim its lock {lock} (other claims kept racing "
                        f"for it); try the {doing} again.")


def _create(lock: Path, record: dict) -> int | None:
    """A new lock file holding `record`, flocked by us from birth: written under a temporary name and hard-linked
    into place (atomic, and fails if one exists), so no reader sees it half-written. None if one exists."""
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    fd = _write_locked(tmp, record)
    try:
        os.link(tmp, lock)
        return fd
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, FileExistsError):
            return None
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):  # no hard links here: exclusive create
            return _create_exclusive(lock, record)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(lock: Path, record: dict) -> int | None:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        return None
    _flock_free(fd)
    _write_record(fd, record)
    return fd


def _write_locked(path: Path, record: dict) -> int:
    """A file only we know of yet, flocked (never contended) and holding `record`."""
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
    _flock_free(fd)
    _write_record(fd, record)
    return fd


def _write_record(fd: int, record: dict) -> None:
    os.write(fd, json.dumps(record, indent=1).encode())
    os.fsync(fd)


def _take_over(lock: Path, record: dict, folder: Path, doing: str) -> int | None:
    """Replace a stale lock (its holder is gone) with ours while holding its flock; raise OutputDirBusy for a
    live one; None when the lock file went away or changed meanwhile (the caller tries again)."""
    try:
        old = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        free = _flock_free(old)
        if not _same_file(old, lock):  # its holder released it meanwhile
            return None
        holder = _read(lock)
        if free is False or _is_live(holder, lock, flock_works=free is not None):
            raise _busy(folder, folder, holder, doing)
        tmp = lock.with_name(f"{lock.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        fd = _write_locked(tmp, record)
        os.replace(tmp, lock)  # atomic: a reader sees the stale record or ours, never a missing lock
        return fd
    finally:
        os.close(old)


def _flock_free(fd: int) -> bool | None:
    """Whether no process held the file's flock (True: we hold it now); None where flock is unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


def _same_file(fd: int, lock: Path) -> bool:
    """Whether `lock` still names the file `fd` holds."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(lock))
    except FileNotFoundError:
        return False


def _live_holder_of(folder: Path) -> LockHolder | None:
    """Who holds `folder` if that holder is live, else None. Takes a free flock for an instant only."""
    lock = lock_path(folder)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        free = _flock_free(fd)
        holder = _read(lock)
        return holder if free is False or _is_live(holder, lock, flock_works=free is not None) else None
    finally:
        os.close(fd)  # drops the flock, if we took it


def _is_live(holder: LockHolder, lock: Path, *, flock_works: bool) -> bool:
    """For a lock nobody flocks: live only where that does not prove the holder gone: a holder on another host, a
    lock still being written, or (where flock does not work) a pid still running here."""
    if holder.pid is None:
        try:
            return time.time() - lock.stat().st_mtime < _YOUNG_S
        except FileNotFoundError:
            return False
    if holder.host != socket.gethostname():
        return True
    if flock_works:
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(lock: Path) -> LockHolder:
    try:
        data = json.loads(lock.read_text())
        return LockHolder(str(data["holder"]), int(data["pid"]), str(data["host"]), float(data["since"]), lock)
    except (OSError, ValueError, KeyError, TypeError):
        return LockHolder("an unknown holder", None, None, None, lock)


def _busy(folder: Path, held: Path, holder: LockHolder, doing: str) -> OutputDirBusy:
    where = f"output_dir {str(folder)!r}" + ("" if held == folder else f" is inside {str(held)!r}, which")
    other_host = holder.host is not None and holder.host != socket.gethostname()
    gone = (f" If that run is gone (this machine cannot check a process on {holder.host}), delete "
            f"{holder.lock_file}." if other_host else "")
    return OutputDirBusy(
        f"{where} is in use by {holder.describe()}: one run writes a folder at a time, so this {doing} was not "
        f"started and nothing was changed. Wait for that run to finish, cancel it (cancel_training with its "
        f"job_id), or pick another output_dir.{gone}")


def _release(lock: Path, fd: int) -> None:
    """Remove our lock file, then drop its flock (in that order: a claimer that opened it meanwhile sees it
    gone and tries again)."""
    try:
        if _same_file(fd, lock):
            lock.unlink()
    finally:
        os.close(fd)
