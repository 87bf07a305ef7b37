"""One run per output folder: an exclusive lock on `output_dir/.rlhfkit.lock` for the whole run
(training stages, `rlhfkit eval`) or on `export_dir/.rlhfkit.lock` (`rlhfkit export`).

The lock is `flock` on the file, which the kernel releases when its holder ends, however it ends;
a clean exit also removes the file. A lock file found unlocked was left by a run that died: it is
taken over with a note naming that run's process. Only one process of a multi-process launch (the
main one) takes the lock. No torch import here: a test process can hold a lock cheaply.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from rlhfkit.errors import fail

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".rlhfkit.lock"


class OutputLock:
    """The exclusive lock of one output folder; `acquire` creates the folder if needed, `release`
    removes the lock file (and the folders `acquire` created, when they are still empty). `key` is
    the config key that names the folder, for the message."""

    def __init__(self, output_dir: str | Path, key: str = "output_dir") -> None:
        self.output_dir = Path(output_dir)
        self.key = key
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> None:
        """Take the lock, or stop with one line naming the folder when another run holds it."""
        if fcntl is None or self._fd is not None:
            return
        missing = self.output_dir
        while not missing.exists():
            self._created.append(missing)
            missing = missing.parent
        self.output_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                self._remove_created()
                raise fail(f"{self.key} {self.output_dir} is in use by another run ({holder or 'unknown process'} "
                           f"holds {self.path.name}); wait for it to end, or choose another {self.key}") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed the file while we waited: lock the new one
        previous = _read(fd)
        if previous:
            logger.warning("note: %s was left by %s, which ended without releasing it; taking it over",
                           self.path, previous)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file, then unlock (a waiting run then finds the file gone and retries)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holds_files(folder: Path) -> bool:
    """Whether `folder` holds anything besides its lock file (for the checks that want it empty)."""
    return any(entry.name != LOCK_FILE for entry in folder.iterdir())


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 256).decode(errors="replace").strip()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class RunLocks:
    """Releases, when the stage ends, the output lock its `start_run` took (`lock_output_dir`)."""

    def __enter__(self) -> "RunLocks":
        global _ACTIVE
        self.locks: list[OutputLock] = []
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None
        for lock in self.locks:
            lock.release()


_ACTIVE: RunLocks | None = None


def hold_lock(output_dir: str | Path) -> OutputLock:
    """Take the lock of `output_dir` until the running stage ends (`run_stage` holds `RunLocks`; outside
    one the lock lasts until the process exits)."""
    lock = OutputLock(output_dir)
    lock.acquire()
    if _ACTIVE is not None:
        _ACTIVE.locks.append(lock)
    return lock
