"""A child slot: one child process, the tasks it hosts, and its restart history.

Every change of a slot's state happens in a method of :class:`ChildSlot`; the arbiter
calls them and never writes a slot's fields itself.  The states:

``down``      no process; ``respawn_at`` says when one is started (None: not planned)
``starting``  spawned, has not said ``ready`` yet (it may be restoring its tables)
``running``   said ``ready``
``stopping``  asked to stop (TERM, or a KILL we chose): its exit is not a crash
``failed``    crashed too often; no process until ``retry_at`` (or a HUP)

Beside the state: ``revoking`` (asked to give back tasks, no ``revoked`` answer yet),
``retiring`` (stops for good: no tasks left, or the shutdown), ``restoring`` (the child
says it is restoring state; shown as the state ``restoring`` in status).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from signal import SIGKILL, SIGTERM
from typing import Any, Container, Deque, Dict, List, Optional, Sequence, Tuple

import psutil

from shardworker.protocol import (EXIT_BROKER_UNAVAILABLE, Bye, Channel, Failed, Message, Offsets, Ready,
                                  Revoke, Revoked, Stats, Timers)

from .metricstore import IncarnationMetrics

log = logging.getLogger("supervisor.children")

BACKOFF_FIRST = 0.1     # seconds before the first restart of a crashed child
BACKOFF_MAX = 10.0      # the backoff doubles per crash up to this
STABLE_AFTER = 30.0     # a child that lived this long starts its backoff afresh
FAILED_RETRY = 300.0    # seconds before a failed slot's tasks are tried again
CHILD_TOKEN_ENV = "SHARDSUP_CHILD_TOKEN"
RATE_WINDOW = 10.0      # seconds over which records/s is computed

#: what :meth:`ChildSlot.after_exit` decided (the arbiter logs each differently)
RESTART, OUTAGE, CRASHED, FAILED = "restart", "outage", "crashed", "failed"


@dataclass(frozen=True)
class RestartPolicy:
    """When a crashing slot is given up (failed) and when a failed one is tried again."""

    max_crashes: int = 5        # crashes (or hangs without progress) before it fails...
    crash_window: float = 60.0  # ...within this many seconds
    failed_retry: float = FAILED_RETRY  # seconds a failed slot waits before a new try


class ChildSlot:
    """Hosts some tasks; the process in it comes and goes (crash, restart, HUP)."""

    def __init__(self, index: int, tasks: List[str]) -> None:
        self.index = index
        self.tasks: List[str] = list(tasks)
        self.proc: Optional[subprocess.Popen] = None
        self.channel: Optional[Channel] = None
        self.state = "down"           # down, starting, running, stopping, failed
        self.started_at = 0.0
        self.restarts = 0
        self.crashes: List[float] = []  # monotonic times of recent crashes
        self.respawn_at: Optional[float] = None
        self.revoking = False
        self.retiring = False          # stop for good (no tasks left, or shutdown)
        self.last_error: Optional[str] = None
        self.error_reported = False    # this incarnation said why it failed (or hung)
        self.retry_at: Optional[float] = None  # failed: when its tasks are tried again
        self.runs_timers = False       # this incarnation was told to run the app's timers
        self.outage_exits = 0          # exits in a row for an unreachable broker
        self.stats = Stats()
        self.last_heard = 0.0
        self.token = ""
        self.trace_path = ""
        self.restoring = False
        self.stop_requested = 0.0   # monotonic time the last TERM was sent
        self.hangs = 0              # heartbeat kills in a row without progress
        self.records_at_hang = -1
        self.records_total = 0      # over every incarnation of this slot
        self.errors_total = 0
        self.records_per_s = 0.0
        self._base_records = 0      # totals of earlier incarnations
        self._base_errors = 0
        self._rate_samples: Deque[Tuple[float, int]] = deque()
        self._psutil: Optional[psutil.Process] = None
        #: the metrics this incarnation sent; the increments not yet taken by the arbiter
        self.metrics = IncarnationMetrics()
        self._metric_deltas: List[Dict[str, Dict[str, Any]]] = []

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None and self.alive else None

    @property
    def alive(self) -> bool:
        return self.state not in ("down", "failed")

    def spawn(self, app_spec: str, bootstrap: str, loglevel: str, trace_path: str,
              log_args: Sequence[str] = (), datadir: str = ".") -> None:
        """Starts the child by fork+exec: a fresh interpreter, no inherited Kafka clients."""
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "shardworker.child", "--app", app_spec,
               "--fd", str(theirs.fileno()), "--index", str(self.index), "--broker", bootstrap,
               "--loglevel", loglevel, "--parent", str(os.getpid()), "--trace-file", trace_path,
               "--datadir", os.path.abspath(datadir), *log_args]
        # Every process the child starts inherits this token, so that once they are
        # orphaned (and adopted by the supervisor, a subreaper) we know whose they were.
        self.token = f"{os.getpid()}-{self.index}-{time.monotonic_ns()}"
        env = {**os.environ, CHILD_TOKEN_ENV: self.token}
        self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                     env=env)
        theirs.close()
        self.trace_path = trace_path
        self.channel = Channel(ours)
        self.state = "starting"
        self.started_at = self.last_heard = time.monotonic()
        self.respawn_at = None
        self.retry_at = None
        self.error_reported = False
        self.runs_timers = False
        self.revoking = False
        self.stats = Stats()
        self._base_records, self._base_errors = self.records_total, self.errors_total
        self._rate_samples = deque([(self.started_at, self.records_total)])
        self.records_per_s = 0.0
        self._psutil = None
        self.metrics = IncarnationMetrics()  # a new process counts from 0 again

    def record_stats(self, stats: Stats) -> None:
        """A heartbeat: counters of this incarnation, lag per task."""
        self.stats = stats
        self.restoring = stats.restoring
        self.records_total = self._base_records + stats.processed
        if stats.processed:
            self.outage_exits = 0  # it got through to the broker again
        self.errors_total = self._base_errors + stats.errors
        if stats.metrics:
            self._metric_deltas.append(self.metrics.update(stats.metrics))
        # records/s over the last RATE_WINDOW seconds: a child counts its records once
        # per batch, so a shorter window would swing between 0 and a peak
        now = time.monotonic()
        samples = self._rate_samples
        samples.append((now, self.records_total))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        then, count = samples[0]
        if now > then:
            self.records_per_s = (self.records_total - count) / (now - then)

    def take_metric_deltas(self) -> List[Dict[str, Dict[str, Any]]]:
        """The counters' and histograms' increments since the last call, for the
        supervisor's :class:`~supervisor.metricstore.MetricTotals`."""
        deltas, self._metric_deltas = self._metric_deltas, []
        return deltas

    def usage(self) -> Tuple[Optional[int], Optional[float]]:
        """(RSS bytes, CPU %) of the process, or (None, None) when it is not running."""
        if self.pid is None:
            return None, None
        try:
            if self._psutil is None or self._psutil.pid != self.pid:
                self._psutil = psutil.Process(self.pid)
                self._psutil.cpu_percent(None)  # the first call only sets the baseline
            with self._psutil.oneshot():
                return self._psutil.memory_info().rss, self._psutil.cpu_percent(None)
        except psutil.Error:
            return None, None

    # -- talking to the process ---------------------------------------------------------
    def send(self, message: Message) -> None:
        if self.channel is not None:
            try:
                self.channel.send(message)
            except EOFError:
                pass  # it is exiting; the exit is handled when it is reaped

    def read(self) -> List[List[List[Any]]]:
        """Takes what the child sent: heartbeats, ``ready``, stats and errors change the
        slot; the offset reports (``offsets``, ``revoked``, ``bye``) are returned in the
        order they came, for the caller to record.  Raises ChannelClosed when it exits."""
        reports: List[List[List[Any]]] = []
        if self.channel is None:
            return reports
        for message in self.channel.receive():
            self.last_heard = time.monotonic()
            if isinstance(message, (Offsets, Revoked, Bye)):
                reports.append(message.offsets)
                if isinstance(message, Revoked):
                    self.revoking = False
            elif isinstance(message, Ready):
                if self.state == "starting":
                    self.state = "running"
            elif isinstance(message, Stats):
                self.record_stats(message)
            elif isinstance(message, Failed):
                self.last_error = message.error
                self.error_reported = True
        return reports

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.alive:
            try:
                os.kill(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    # -- tasks ------------------------------------------------------------------------
    def add_tasks(self, tasks: Sequence[str]) -> None:
        self.tasks.extend(tasks)

    def drop_tasks(self, gone: Container[str]) -> None:
        """Forgets tasks the group took away (the process gave them back or is gone)."""
        self.tasks = [t for t in self.tasks if t not in gone]

    def revoke(self, partitions: List[List[Any]]) -> None:
        """Asks the process to give back ``partitions``; ``revoking`` until it answers."""
        self.revoking = True
        self.send(Revoke(partitions))

    def run_timers(self, wanted: bool) -> bool:
        """Tells the process to run the app's timers or not; False when it knew already."""
        if self.runs_timers == wanted:
            return False
        self.send(Timers(wanted))
        self.runs_timers = wanted
        return True

    # -- stopping and killing ---------------------------------------------------------
    def stop(self, now: float, signum: Optional[int] = SIGTERM) -> None:
        """A planned stop: its exit is not counted as a crash.  Sends ``signum`` (None:
        the caller signals it later)."""
        if not self.alive:
            return
        self.state = "stopping"
        self.stop_requested = now
        if signum is not None:
            self.signal(signum)

    def retire(self, now: float, signum: Optional[int] = SIGTERM) -> bool:
        """Stops the slot for good (no tasks left, or the shutdown); True while a process
        is still there to be reaped (False: the slot can be dropped now)."""
        self.retiring = True
        self.stop(now, signum)
        return self.alive

    def restart(self, now: float) -> None:
        """HUP: the process stops (TERM) and is started again once reaped; a failed slot
        is started again at once.  The crash history starts afresh."""
        self.crashes.clear()
        if self.alive:
            self.stop(now)
        elif self.state == "failed":
            self.state = "down"
            self.respawn_at = now

    def kill(self, planned: bool = False) -> None:
        """KILL now.  ``planned``: a stop we chose (lost tasks not given back in time),
        so the exit restarts it at once instead of counting as a crash."""
        if planned and self.alive:
            self.state = "stopping"
        self.signal(SIGKILL)

    def stop_overdue(self, now: float, timeout: float) -> bool:
        """A stop asked more than ``timeout`` seconds ago and not done: KILL it (once per
        ``timeout``).  True when it was killed now."""
        if self.state != "stopping" or now - self.stop_requested <= timeout:
            return False
        self.signal(SIGKILL)
        self.stop_requested = now
        return True

    def silent_for(self, now: float) -> float:
        """Seconds since the process was last heard from (0 unless starting or running)."""
        return now - self.last_heard if self.state in ("starting", "running") else 0.0

    def hung(self, now: float) -> None:
        """No heartbeat for too long: KILL it, and count the hang.  Hangs with no
        progress in between count toward failure however long each incarnation lived
        (the crash window alone would never see them)."""
        self.last_error = f"no heartbeat for {now - self.last_heard:.0f}s"
        self.error_reported = True
        self.hangs = self.hangs + 1 if self.records_total == self.records_at_hang else 1
        self.records_at_hang = self.records_total
        self.signal(SIGKILL)
        self.last_heard = now  # one kill; the exit is handled when it is reaped

    # -- exits and restarts -----------------------------------------------------------
    def exited(self) -> bool:
        """The process is gone (reaped): closes its channel.  Returns whether the exit was
        planned (it had been asked to stop)."""
        planned = self.state == "stopping"
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.state != "failed":
            self.state = "down"
        return planned

    def after_exit(self, code: int, now: float, planned: bool,
                   policy: RestartPolicy) -> Tuple[str, Optional[float]]:
        """Decides what follows the exit of a slot that keeps its tasks; returns what
        (RESTART, OUTAGE, CRASHED or FAILED) and the delay before the next start.

        A planned stop (a HUP, lost tasks) that ended cleanly, or one of a child giving
        back tasks, restarts at once; a child that stopped because the broker was
        unreachable restarts with a backoff and no crash counted; anything else is a
        crash, restarted with a backoff until ``policy`` says the slot failed (which
        hangs without progress also bring about)."""
        if planned and (code == 0 or self.revoking):
            self.respawn_at = now
            return RESTART, 0.0
        self.note_exit(code)
        if code == EXIT_BROKER_UNAVAILABLE:
            return OUTAGE, self.schedule_outage_restart(now)
        delay = self.schedule_restart(now, policy.max_crashes, policy.crash_window)
        if delay is not None and self.hangs >= policy.max_crashes and self.last_error \
                and self.last_error.startswith("no heartbeat"):
            delay = None
        if delay is None:
            self.fail(now, policy.failed_retry)
            return FAILED, None
        return CRASHED, delay

    def respawn_due(self, now: float) -> bool:
        """A down slot whose restart time has come: counts the restart, True."""
        if self.state != "down" or self.respawn_at is None or now < self.respawn_at:
            return False
        self.restarts += 1
        return True

    def note_exit(self, code: int) -> None:
        """Keeps why the process ended as ``last_error`` when it did not say so itself (an
        ``os._exit`` or a signal), so a failed task always shows an error in status."""
        if not self.error_reported:
            self.last_error = (f"killed by signal {-code}" if code < 0
                               else f"exited with code {code}")

    def fail(self, now: float, retry_after: float) -> None:
        """Marks the slot failed: no process, its tasks tried again after ``retry_after``
        seconds (or at HUP), so a task is never abandoned for good."""
        self.state = "failed"
        self.respawn_at = None
        self.retry_at = now + retry_after

    def retry_due(self, now: float) -> bool:
        """A failed slot whose long backoff is over: start it again, with a clean crash
        history (it gets ``max_crashes`` more tries before it fails again), due now."""
        if self.state != "failed" or self.retry_at is None or now < self.retry_at:
            return False
        self.state = "down"
        self.crashes.clear()
        self.hangs = 0
        self.retry_at = None
        self.respawn_at = now
        return True

    def schedule_outage_restart(self, now: float) -> float:
        """The child stopped because the broker was unreachable: restart it with a
        backoff (doubling up to BACKOFF_MAX while the outage lasts) without recording a
        crash, so an outage never marks tasks FAILED.  Returns the delay."""
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(self.outage_exits, 16))
        self.outage_exits += 1
        self.respawn_at = now + delay
        return delay

    def schedule_restart(self, now: float, max_crashes: int, window: float) -> Optional[float]:
        """Records a crash; returns the backoff before the next start, or None when the
        slot crashed ``max_crashes`` times within ``window`` seconds (it is then failed)."""
        if now - self.started_at >= STABLE_AFTER:
            self.crashes.clear()
        self.crashes = [t for t in self.crashes if now - t < window] + [now]
        if len(self.crashes) >= max_crashes:
            self.state = "failed"
            self.respawn_at = None
            return None
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(self.crashes) - 1))
        self.respawn_at = now + delay
        return delay
