"""Writer lock of a cache file, so overlapping extraction runs take turns."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

NO_LOCK_ENV = "CONVCACHE_NO_LOCK"


# flock errors that mean the file system cannot lock at all (NFS without lockd, some FUSE mounts).
_NO_LOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class CacheLockError(RuntimeError):
    """Raised when the writer lock of a cache cannot be taken."""


def _make_file_lock(lock_path: Path) -> FileLock:
    """Create the FileLock; where filelock offers it, fail rather than fall back to a marker-file lock."""
    try:
        return FileLock(str(lock_path), fallback_to_soft=False)
    except TypeError:  # filelock < 4 has no fallback and no such argument
        return FileLock(str(lock_path))


def _probe_flock(lock_path: Path) -> None:
    """Raise the OSError of ``flock`` where the file system cannot lock; contention is not an error.

    filelock 3.x treats every flock error as contention, which would turn a file
    system without locks into a misleading timeout, so the capability is checked here.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # another process holds the lock: the file system can lock
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class CacheLock:
    """Exclusive writer lock on ``CACHE.lock``, with the holder recorded in ``CACHE.lock.json``.

    Readers never take it. With ``enabled=False`` (or ``CONVCACHE_NO_LOCK=1``) no lock is
    taken: use that only on file systems without working ``fcntl`` locks, and only
    when no two writers can run at once.

    Parameters
    ----------
    cache_path : Path
        The cache file the lock guards.
    timeout : float
        Seconds to wait for another writer; a negative value waits forever.
    """

    def __init__(self, cache_path: Path, timeout: float = 600.0, enabled: bool | None = None) -> None:
        self.cache_path = Path(cache_path)
        self.lock_path = Path(str(cache_path) + ".lock")
        self.owner_path = Path(str(cache_path) + ".lock.json")
        self.timeout = timeout
        if enabled is None:
            enabled = os.environ.get(NO_LOCK_ENV, "") not in ("1", "true", "yes")
        self.enabled = enabled
        self._lock = _make_file_lock(self.lock_path)

    def holder(self) -> str:
        """Describe the process that holds the lock, as recorded when it took it."""
        try:
            info = json.loads(self.owner_path.read_text())
        except (OSError, ValueError):
            return "an unknown process"
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('command')})"

    def __enter__(self) -> CacheLock:
        if not self.enabled:
            logger.warning("cache lock disabled: concurrent writers to %s would not be detected", self.lock_path)
            return self
        started = time.monotonic()
        try:
            _probe_flock(self.lock_path)
            self._acquire(started)
        except (OSError, NotImplementedError) as error:
            if isinstance(error, OSError) and error.errno not in _NO_LOCK_ERRNOS:
                raise
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise CacheLockError(
                f"the file system of {self.lock_path} does not support locks ({reason}). "
                f"Either 1) put the cache on a local disk, or 2) set {NO_LOCK_ENV}=1 (or pass --no-lock) "
                "and make sure no two extraction runs use this cache at once."
            ) from error
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv[:3]),
        }
        # Written by rename, so a waiting process never reads half a record. The staging name
        # matches the temporary-file pattern that writers delete after a crash.
        staging = self.cache_path.with_name(f".{self.cache_path.name}.tmp-holder-{os.getpid()}")
        staging.write_text(json.dumps(owner))
        os.replace(staging, self.owner_path)
        return self

    def _acquire(self, started: float) -> None:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            logger.info("cache %s is locked by %s; waiting up to %s s", self.lock_path, self.holder(), self.timeout)
            try:
                self._lock.acquire(timeout=self.timeout)
            except Timeout as error:
                raise CacheLockError(
                    f"timed out after {time.monotonic() - started:.0f} s waiting for the writer lock "
                    f"{self.lock_path}, held by {self.holder()}. Either 1) wait for that run to finish, "
                    "2) raise --lock-timeout, or 3) if that process is gone, run again: the operating "
                    "system released its lock."
                ) from error

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.enabled and self._lock.is_locked:
            self.owner_path.unlink(missing_ok=True)
            self._lock.release()
