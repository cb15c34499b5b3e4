"""Writer lock of a cache file, so overlapping extraction runs take turns."""

from __future__ import annotations

import errno
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


class CacheLockError(RuntimeError):
    """Raised when the writer lock of a cache cannot be taken."""


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
        self.lock_path = Path(str(cache_path) + ".lock")
        self.owner_path = Path(str(cache_path) + ".lock.json")
        self.timeout = timeout
        if enabled is None:
            enabled = os.environ.get(NO_LOCK_ENV, "") not in ("1", "true", "yes")
        self.enabled = enabled
        self._lock = FileLock(str(self.lock_path))

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
            self._lock.acquire(timeout=0)
        except Timeout:
            logger.info("cache %s is locked by %s; waiting up to %s s", self.lock_path, self.holder(), self.timeout)
            try:
                self._lock.acquire(timeout=self.timeout)
            except Timeout as error:
                raise CacheLockError(
                    f"timed out after {time.monotonic() - started:.0f} s waiting for the writer lock {self.lock_path}, "
                    f"held by {self.holder()}. Either 1) wait for that run to finish, 2) raise --lock-timeout, or "
                    "3) if that process is gone, run again: the operating system released its lock."
                ) from error
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise CacheLockError(
                    f"the file system of {self.lock_path} does not support locks ({error.strerror}). "
                    f"Either 1) put the cache on a local disk, or 2) set {NO_LOCK_ENV}=1 (or pass --no-lock) "
                    "and make sure no two extraction runs use this cache at once."
                ) from error
            raise
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv[:3]),
        }
        self.owner_path.write_text(json.dumps(owner))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.enabled and self._lock.is_locked:
            self.owner_path.unlink(missing_ok=True)
            self._lock.release()
