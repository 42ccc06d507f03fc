"""Processes that user code started: found by the token their child left in their
environment, and ended (TERM, then KILL after a grace period) so none outlive us."""
from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import Iterable, List, Optional, Set

import psutil

from .children import CHILD_TOKEN_ENV

log = logging.getLogger("supervisor.descendants")

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants (double-forked by user code) become ours to reap."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def adopted(exclude: Iterable[int]) -> List[psutil.Process]:
    """Our direct children that we did not start: orphans reparented to us (subreaper),
    with their own descendants."""
    skip: Set[int] = set(exclude)
    found: List[psutil.Process] = []
    try:
        direct = psutil.Process(os.getpid()).children()
    except psutil.Error:
        return found
    for proc in direct:
        if proc.pid in skip:
            continue
        found.append(proc)
        try:
            found.extend(proc.children(recursive=True))
        except psutil.Error:
            pass
    return found


def token_of(proc: psutil.Process) -> Optional[str]:
    try:
        return proc.environ().get(CHILD_TOKEN_ENV)
    except psutil.Error:
        return None


def terminate(procs: List[psutil.Process], grace: float = 2.0) -> int:
    """TERM, wait up to ``grace`` seconds, then KILL; returns how many were ended."""
    if not procs:
        return 0
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    alive = _wait(procs, grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _wait(alive, grace)
    return len(procs)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait(procs: List[psutil.Process], timeout: float) -> List[psutil.Process]:
    """Waits until they have exited; zombies count as exited (the arbiter's reap() collects
    them, so exits of our own children are never taken from it)."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if _running(p)]
    return alive


def end_orphans(exclude: Iterable[int], token: Optional[str] = None, grace: float = 2.0) -> int:
    """Ends adopted orphans (only those of one child's incarnation when ``token`` is given)."""
    procs = adopted(exclude)
    if token is not None:
        procs = [p for p in procs if token_of(p) == token]
    if procs:
        log.info("ending %d orphaned descendant(s): %s", len(procs),
                 ", ".join(str(p.pid) for p in procs))
    started = time.monotonic()
    count = terminate(procs, grace)
    if count:
        log.debug("orphans ended in %.2fs", time.monotonic() - started)
    return count
