"""The orphan guard: a tiny process that outlives a supervisor killed with KILL and ends
whatever the supervisor's children had started.

Children die with the supervisor (PR_SET_PDEATHSIG), but a process that user code
double-forked was adopted by the supervisor and is reparented to init when it dies.
The guard is forked at start-up, before any thread or Kafka client exists, and waits on
a pipe; EOF means the supervisor is gone (however it went).  It then ends every process
whose environment carries a child token of that supervisor (``SHARDSUP_CHILD_TOKEN``
begins with its pid) and exits.
"""
from __future__ import annotations

import os
import signal
import time
from typing import List, Tuple

from .children import CHILD_TOKEN_ENV


def start_guard() -> Tuple[int, int]:
    """Forks the guard; returns its pid and the write end of its pipe (close it, or die,
    to release it).  Call it before any thread or Kafka client exists: the guard runs Python after
    fork without exec."""
    supervisor = os.getpid()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(read_end)
        os.set_inheritable(write_end, False)  # children must not hold the supervisor's end
        return pid, write_end
    try:  # the guard
        os.close(write_end)
        # hold nothing of the supervisor's: above all not the datadir lock, which a new
        # supervisor must be able to take as soon as this one is dead
        os.closerange(3, read_end)
        os.closerange(read_end + 1, 65536)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)  # it stays until the supervisor is gone
        try:
            from setproctitle import setproctitle

            setproctitle(f"shardsup: guard of supervisor {supervisor}")
        except ImportError:  # pragma: no cover
            pass
        while os.read(read_end, 1):
            pass
        sweep(f"{supervisor}-")
    finally:
        os._exit(0)


def marked(prefix: str) -> List[int]:
    """Pids of the processes whose child token begins with ``prefix``."""
    needle = f"{CHILD_TOKEN_ENV}={prefix}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if any(var.startswith(needle) for var in f.read().split(b"\0")):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def sweep(prefix: str, grace: float = 2.0) -> None:
    """TERM, then KILL after ``grace`` seconds, every process marked with ``prefix``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked(prefix)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
