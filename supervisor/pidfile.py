"""One supervisor per datadir: an exclusive lock on the pid file for the supervisor's life.

The lock, not the file's existence, says whether a supervisor runs: a pid file left by a
supervisor killed with KILL is stale and is taken over.

The datadir is private (DESIGN.md, "State (LMDB)": it holds the app's state): created
0700, the pid file 0600, and the pid file is never opened through a symbolic link.  A
link planted in its place is refused with one line (not removed: someone put it there,
and the operator should see it), so the supervisor never truncates a file elsewhere.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from typing import Optional

from shardworker.logs import open_private

from .errors import UsageError

log = logging.getLogger("supervisor")


def pid_path(datadir: str) -> str:
    return os.path.join(datadir, "supervisor.pid")


class PidFile:
    """Held by the running supervisor."""

    def __init__(self, datadir: str) -> None:
        self.path = pid_path(datadir)
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        datadir = os.path.dirname(self.path)
        try:
            os.makedirs(datadir, mode=0o700, exist_ok=True)
            fd = open_private(self.path, os.O_RDWR)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{self.path} is a symbolic link; refusing to follow it "
                                 "(remove it, or choose another datadir)") from None
            raise UsageError(f"cannot use datadir {datadir}: {exc.strerror or exc}") from None
        warn_if_shared(datadir)
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


def warn_if_shared(datadir: str) -> None:
    """A datadir that existed before, open to others: said once, left as it is (its
    mode is the operator's choice; what we create in it is private all the same)."""
    try:
        mode = stat.S_IMODE(os.stat(datadir).st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning("datadir %s is open to other users (mode %04o); chmod 700 it to keep "
                    "the state private", datadir, mode)


def running_pid(datadir: str) -> Optional[int]:
    """The pid of the supervisor running on ``datadir``, or None when none holds the lock."""
    try:
        fd = os.open(pid_path(datadir), os.O_RDONLY | os.O_NOFOLLOW)
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
