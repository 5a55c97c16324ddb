"""One process per run directory: an OS advisory lock on `RUN/.lock`, held for the whole run.

Two processes training into one run directory would interleave their log rows and overwrite each
other's checkpoints, so the second one stops at once with a one-line error instead. The lock is
`fcntl.flock` on an open file: the kernel drops it when its process dies, however it dies, so a
run killed by SIGKILL or a power cut leaves no stale lock and `--resume` needs no cleanup. The
file holds the holder's pid, for the error message only; the lock, not the file, is what counts.

Under torchrun only rank 0 would take it: `RunLock(run_dir, held=rank == 0)`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path
from types import TracebackType

from rlino.errors import UserError

LOCK_NAME = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class RunInUse(UserError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """The run directory's lock; `acquire()` takes it (idempotent), leaving the block releases it."""

    def __init__(self, run_dir: Path, *, held: bool = True) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self.held = held
        """False: this process never takes the lock (a non-zero torchrun rank)."""
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this process holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (the directory must exist), or raise RunInUse at once."""
        if not self.held or self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not self._flock(fd, fcntl.LOCK_EX):
            os.close(fd)
            raise self._in_use()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def check_free(self) -> None:
        """Raise RunInUse if another process holds the lock; creates nothing (no dir needed)."""
        if not self.held or self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if not self._flock(fd, fcntl.LOCK_SH):
                raise self._in_use()
        finally:
            os.close(fd)  # also drops the shared lock taken to probe

    def release(self) -> None:
        """Drop the lock (closing the file does it); the file stays, empty locks cost nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _flock(self, fd: int, kind: int) -> bool:
        """Try to lock without waiting: False if another process holds it. A file system without
        locks (rare; some network mounts) gets a warning and counts as free."""
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            print(
                f"warning: cannot lock {self.path} ({e.strerror}); "
                "make sure no other process uses this run directory",
                file=sys.stderr,
            )
        return True

    def _in_use(self) -> RunInUse:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        who = f"another process (pid {pid})" if pid.isdigit() else "another process"
        return RunInUse(f"{self.run_dir} is in use by {who}; wait for it to end or stop it first")
