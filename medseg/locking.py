"""One writing command at a time per output folder: an advisory lock, freed by the OS when the process ends."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from medseg.errors import DataError

#: The lock file in an output folder while a command writes there (hidden: input discovery skips it).
LOCK_FILE = ".medseg.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold ``folder``'s lock while ``command`` (``"train"``, ``"evaluate"``, ``"infer"``) writes there.

    The lock is ``fcntl.flock`` on :data:`LOCK_FILE`, which records who holds it (for the message) and is
    removed at the end. The system frees the lock when the holder ends, however it ends, so the file a killed
    command leaves is taken over by the next. A lock taken on a file another holder has just removed is
    dropped and taken again on the new one. On systems without ``fcntl`` (Windows) no lock is taken; some
    network filesystems do not honour ``flock`` between machines.

    Raises:
        DataError: another command holds the folder's lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(folder) / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # left by another user's killed command: a lock needs no write access
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                yield  # unusable here: no lock rather than no command
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(f"{folder}: {_holder(path)} is writing into this folder; wait for it to end, or "
                            "choose another output folder") from None
        except OSError:  # no locks on this filesystem (ENOLCK on some network shares): go on without one
            os.close(fd)
            yield
            return
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed by the holder that just ended: lock the one there now
    try:
        holder = {"command": f"medseg {command}", "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with contextlib.suppress(OSError):  # a read-only lock file keeps its old words
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the lock, so no one locks the removed file and stays
        os.close(fd)  # frees the lock


def holder_of(folder: str | os.PathLike) -> str | None:
    """Who is writing into ``folder`` now (a command holding its lock), in words; ``None`` when no one is, or no
    lock can tell (no ``fcntl``, no lock file, a filesystem without locks)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken at once when no one holds it
    except BlockingIOError:
        return _holder(path)
    except OSError:
        return None
    finally:
        os.close(fd)  # frees a lock taken here
    return None


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, in words (``another command`` when the record is unreadable)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"{holder['command']} (process {holder['pid']} on {holder['host']}, since {holder['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another command"
