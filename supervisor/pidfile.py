"""One supervisor per datadir: an exclusive lock on the pid file for the supervisor's life.

The lock, not the file's existence, says whether a supervisor runs: a pid file left by a
supervisor killed with KILL is stale and is taken over.
"""
from __future__ import annotations

import fcntl
import os
from typing import Optional

from .errors import UsageError


def pid_path(datadir: str) -> str:
    return os.path.join(datadir, "supervisor.pid")


class PidFile:
    """Held by the running supervisor."""

    def __init__(self, datadir: str) -> None:
        self.path = pid_path(datadir)
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot use datadir {os.path.dirname(self.path)}: "
                             f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 32).decode().strip() or "?"
            os.close(fd)
            raise UsageError(f"datadir {os.path.dirname(self.path)} is in use by a running "
                             f"supervisor (pid {other})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def running_pid(datadir: str) -> Optional[int]:
    """The pid of the supervisor running on ``datadir``, or None when none holds the lock."""
    try:
        fd = os.open(pid_path(datadir), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 32).decode().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)  # we got the lock: nobody holds it
        return None
    finally:
        os.close(fd)
