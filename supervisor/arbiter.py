"""The supervisor's main loop, in the manner of gunicorn's arbiter.

Signals are queued by tiny handlers and the loop is woken through a self-pipe; each
signal has its own ``handle_<name>`` method.  ``spawn`` starts children, ``reap``
collects them, ``signal_all_children`` signals them all at once; what a slot goes
through is in :class:`~supervisor.children.ChildSlot`, what a rebalance does with the
tasks in :class:`~supervisor.rebalance.Assignment`, what status shows in
:mod:`supervisor.snapshot`.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import signal
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from shardworker.app import App
from shardworker.protocol import ChannelClosed

from . import sdnotify
from .broker import EmbeddedBroker, check_broker_and_topics, open_broker
from .children import CRASHED, FAILED, FAILED_RETRY, OUTAGE, RESTART, ChildSlot, RestartPolicy
from .descendants import become_subreaper, end_orphans
from .dump import collect_trace, dump_report, latest_dump_path, trace_path
from .globalmirror import GlobalMirror
from .guard import start_guard
from .membership import GroupMember
from .pidfile import PidFile
from .placement import choose_timer_owner
from .rebalance import Assignment
from .metricstore import MetricTotals, families
from .snapshot import snapshot, status_line
from .subtopologies import topic_kinds
from .status import StatusServer, status_socket_path

if TYPE_CHECKING:  # imported when --web-port asks for it: 20 ms of every start otherwise
    from .web import WebServer

log = logging.getLogger("supervisor")

SNAPSHOT_EVERY = 1.0  # seconds between refreshes of the snapshot the web thread serves
#: seconds between loop turns until the group's first assignment (then 0.1): librdkafka
#: hands the assignment over only in a poll, which the loop makes once per turn
JOIN_TURN = 0.01


def make_private() -> None:
    """Every file and folder this process and its children create is private to the
    user (0600 files, 0700 folders: LMDB state, logs, dumps, traces, the pid file, the
    status socket), whatever the umask of the shell or service manager that started us:
    the state holds the app's data (DESIGN.md, "State (LMDB)").  Children inherit it."""
    os.umask(0o077)


class Arbiter:
    """Owns the group membership and the children; commits what they processed."""

    SIGNALS = [signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGTERM,
               signal.SIGUSR1, signal.SIGCHLD]
    SIG_NAMES = {sig: sig.name[3:].lower() for sig in SIGNALS}

    def __init__(self, app: App, app_spec: str, max_children: int, broker: str,
                 datadir: str, loglevel: str = "info", shutdown_timeout: float = 30.0,
                 child_timeout: float = 60.0, max_crashes: int = 5, crash_window: float = 60.0,
                 exit_on_task_failure: bool = False, web_host: str = "127.0.0.1",
                 web_port: Optional[int] = None, log_args: Sequence[str] = (),
                 failed_retry: float = FAILED_RETRY) -> None:
        self.app = app
        self.app_spec = app_spec
        self.max_children = max(1, max_children)
        self.broker_url = broker
        self.datadir = datadir
        self.loglevel = loglevel
        self.shutdown_timeout = shutdown_timeout
        self.child_timeout = child_timeout
        self.restart_policy = RestartPolicy(max_crashes, crash_window, failed_retry)
        self.exit_on_task_failure = exit_on_task_failure
        self.exit_code = 0
        self.web_host = web_host
        self.web_port = web_port
        self.log_args = list(log_args)
        self.started_at = time.monotonic()
        self.state = "starting"          # starting, running, stopping (for status)
        self.status_server: Optional[StatusServer] = None
        self.web: Optional[WebServer] = None
        self.latest_snapshot: Dict[str, object] = {}
        self._last_snapshot = 0.0
        self._watchdog_every = sdnotify.watchdog_interval()
        self._last_watchdog = 0.0
        self._notified_ready = False
        self._last_status_line = ""
        self.topology = app.topology
        self.topic_kinds = topic_kinds(app)  # which sources are repartition topics (status, dumps)
        self.SIG_QUEUE: List[int] = []
        self.PIPE: List[int] = []
        self.slots: Dict[int, ChildSlot] = {}
        #: the partitions the group gave us, their offsets, and the rebalances' moves
        self.assignment = Assignment(app, self)
        self.stopping: Optional[str] = None   # None, "warm" or "cold"
        self.closing = False
        self.embedded: Optional[EmbeddedBroker] = None
        self.bootstrap = ""
        self.member: Optional[GroupMember] = None
        self.pidfile = PidFile(datadir)
        self.guard_fd: Optional[int] = None
        self.guard_pid: Optional[int] = None
        self.mirror: Optional[GlobalMirror] = None   # the global tables' copies
        #: counters and histograms of every child process, summed (DESIGN.md, "Metrics")
        self.metric_totals = MetricTotals()

    # -- start-up -------------------------------------------------------------------
    def run(self) -> int:
        """Runs until a shutdown signal; returns the exit code."""
        make_private()
        self.pidfile.acquire()
        self.init_signals()
        try:
            become_subreaper()
            # before any thread or Kafka client exists: the guard forks without exec
            self.guard_pid, self.guard_fd = start_guard()
            self.status_server = StatusServer(status_socket_path(self.datadir), self.handle_request)
            if self.web_port is not None:
                from .web import WebServer

                self.web = WebServer(self.web_host, self.web_port, lambda: self.latest_snapshot)
                self.web.start()
            self.embedded, self.bootstrap = open_broker(self.broker_url)
            cluster, partitions = check_broker_and_topics(self.app, self.bootstrap)
            log.info("app %s on %s (cluster %s): sub-topologies %s, up to %d children, %s",
                     self.app.id, self.bootstrap, cluster or "?", "; ".join(
                         f"{sub.index}: " + ",".join(f"{t}[{partitions[t]}]" for t in sub.sources)
                         + (f" (tables {','.join(sub.tables)})" if sub.tables else "")
                         for sub in self.topology.subtopologies),
                     self.max_children, self.app.settings["processing_guarantee"])
            # before any child: children wait until the copies caught up (DESIGN.md, "Global tables")
            self.mirror = GlobalMirror(self.app, self.bootstrap, self.datadir, cluster)
            self.mirror.start()
            a = self.assignment
            self.member = GroupMember(self.app, self.bootstrap, a.on_assign, a.on_revoke, a.on_lost)
            self.member.subscribe(self.topology.leaders)
            tasks = sum(partitions[sub.leader] for sub in self.topology.subtopologies)
            self.start_ahead(min(self.max_children, max(1, tasks)))
            self.set_title("supervisor")
            while self.stopping is None:
                self.loop_once()
            return self.shutdown()
        finally:
            if self.guard_fd is not None:
                os.close(self.guard_fd)  # the guard sweeps (nothing left by now) and exits
                self.wait_for_guard()
            if self.mirror is not None:
                self.mirror.stop()
            if self.web is not None:
                self.web.stop()
            if self.status_server is not None:
                self.status_server.close()
            if self.embedded is not None:
                self.embedded.stop()
            self.pidfile.release()

    def loop_once(self) -> None:
        self.sleep(0.1 if self.assignment.joined else JOIN_TURN)
        self.notify_ready()
        while self.SIG_QUEUE and self.stopping is None:
            self.dispatch(self.SIG_QUEUE.pop(0))
        self.read_children()
        assert self.member is not None
        self.member.poll()
        self.assignment.place_unplaced()
        self.assignment.share_group_metadata()
        self.spawn_due()
        self.assign_timers()
        self.check_heartbeats()
        self.assignment.commit(force=False)

    def set_title(self, role: str) -> None:
        from setproctitle import setproctitle

        setproctitle(f"shardsup: {self.app.id} {role}")

    # -- signals --------------------------------------------------------------------
    def init_signals(self) -> None:
        self.PIPE = list(os.pipe())
        for fd in self.PIPE:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        for sig in self.SIGNALS:
            signal.signal(sig, self.queue_signal)

    def queue_signal(self, sig: int, frame: object) -> None:
        # CHLD is queued once (reap() collects every exit); shutdown signals never dropped
        if sig == signal.SIGCHLD and sig in self.SIG_QUEUE:
            return
        if len(self.SIG_QUEUE) < 5 or sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.SIG_QUEUE.append(sig)
        self.wakeup()

    def wakeup(self) -> None:
        try:
            os.write(self.PIPE[1], b".")
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def sleep(self, timeout: float) -> None:
        """Waits for a signal, a child's message, a status request, or the timeout.

        Every waiting loop (main, revoke, shutdown) comes through here, so this is also
        where systemd's watchdog is fed and the snapshot for the web thread is refreshed.
        """
        fds: List[object] = [self.PIPE[0]] + [s.channel for s in self.slots.values() if s.channel is not None]
        if self.status_server is not None:
            fds.append(self.status_server)
        try:
            ready = select.select(fds, [], [], timeout)[0]
        except InterruptedError:
            ready = []
        if self.PIPE[0] in ready:
            try:
                while os.read(self.PIPE[0], 64):
                    pass
            except BlockingIOError:
                pass
        if self.status_server is not None and self.status_server in ready:
            self.status_server.serve_ready()
        now = time.monotonic()
        if self._watchdog_every and now - self._last_watchdog >= self._watchdog_every:
            sdnotify.watchdog()
            self._last_watchdog = now
        if now - self._last_snapshot >= SNAPSHOT_EVERY:
            self.latest_snapshot = self.snapshot()
            self._last_snapshot = now
            line = status_line(self.slots.values())
            if line != self._last_status_line:
                sdnotify.status(line)
                self._last_status_line = line

    def dispatch(self, sig: int) -> None:
        name = self.SIG_NAMES.get(sig)
        if name is None:
            return
        if name != "chld":
            log.info("handling signal %s", name.upper())
        getattr(self, f"handle_{name}")()

    def handle_chld(self) -> None:
        self.reap()

    def handle_term(self) -> None:
        """Warm shutdown: children finish their batch and commit; or cold if repeated."""
        self.stopping = "cold" if self.stopping else "warm"

    handle_int = handle_term

    def handle_quit(self) -> None:
        """Cold shutdown: kill the children now; uncommitted work is redelivered later."""
        self.stopping = "cold"

    def handle_hup(self) -> None:
        """Graceful restart of every child (new code); the membership is kept."""
        sdnotify.reloading("restarting children")
        self._notified_ready = False  # READY=1 again once the new children run
        for slot in self.slots.values():
            slot.restart(time.monotonic())  # TERM: reaped, then spawned again at once

    def handle_usr1(self) -> None:
        """Tracebacks of every thread of the supervisor and of every child, with each
        child's tasks and offsets, in one report: logged and written under the datadir."""
        report = dump_report(self.app.id, self.datadir, self.slots.values(),
                             self.assignment.offsets, self.topology, self.topic_kinds)
        log.warning("traceback report (also in %s):\n%s", latest_dump_path(self.datadir), report)

    # -- children -------------------------------------------------------------------
    def spawn(self, slot: ChildSlot) -> None:
        """Starts the process of a slot and hands it its tasks with their start offsets."""
        self.start_process(slot)
        log.info("started child %d (pid %d) for tasks %s", slot.index, slot.pid, ",".join(slot.tasks))
        self.assignment.assign_new_child(slot)

    def start_ahead(self, count: int) -> None:
        """Starts ``count`` children (the app's tasks, up to ``-c``) while the group is
        joined (a broker answers a first join after seconds): their imports and Kafka
        clients are ready when the tasks come, and no child's share starts late.  They take
        tasks like running children (``Assignment.place``); one given none (other
        supervisors share the group) stops (``Assignment.release_unused``)."""
        for index in range(count):
            slot = self.slots[index] = ChildSlot(index, [])
            self.start_process(slot)
            log.info("started child %d (pid %d) ahead of the group's assignment", index, slot.pid)

    def start_process(self, slot: ChildSlot) -> None:
        slot.spawn(self.app_spec, self.bootstrap, self.loglevel, trace_path(self.datadir, slot.index),
                   self.log_args, self.datadir)

    def spawn_due(self) -> None:
        """Starts the slots whose restart is due (a failed one whose retry came, too)."""
        now = time.monotonic()
        for slot in list(self.slots.values()):
            if slot.retry_due(now):
                log.warning("tasks %s: trying them again %.0fs after they failed (last error: %s)",
                            ",".join(slot.tasks), self.restart_policy.failed_retry, slot.last_error)
            if slot.respawn_due(now):
                self.spawn(slot)

    def reap(self) -> None:
        """Collects every exited child or adopted descendant."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self.embedded is not None and self.embedded.proc is not None and pid == self.embedded.proc.pid:
                self.embedded.proc.returncode = code
                if self.stopping is None:
                    log.error("the embedded broker exited (code %s); shutting down", code)
                    self.stopping = "cold"
                continue
            slot = next((s for s in self.slots.values() if s.pid == pid), None)
            if slot is None:
                continue  # an orphaned descendant of a child, now reaped
            if slot.proc is not None:
                slot.proc.returncode = code
            self.child_exited(slot, code)

    def child_exited(self, slot: ChildSlot, code: int) -> None:
        try:
            self.read_child(slot)  # its last offsets may still be in the socket
        except ChannelClosed:
            pass
        planned = slot.exited()
        # what the child started goes with it (double-forked helpers were adopted by us)
        end_orphans(self.known_pids(), token=slot.token)
        if slot.retiring or not slot.tasks:
            del self.slots[slot.index]
            log.info("child %d exited (code %s)", slot.index, code)
            return
        if self.stopping is not None:
            return
        policy = self.restart_policy
        outcome, delay = slot.after_exit(code, time.monotonic(), planned, policy)
        tasks = ",".join(slot.tasks)
        if outcome == RESTART:
            log.info("child %d restarted (tasks %s)", slot.index, tasks)
        elif outcome == OUTAGE:
            log.warning("child %d (tasks %s) stopped: the broker is unreachable (%s); "
                        "restarting in %.1fs (an outage is not counted as a crash)",
                        slot.index, tasks, slot.last_error, delay)
        elif outcome == FAILED:
            log.error("tasks %s FAILED: their child crashed %d times within %.0fs (last exit "
                      "code %s, last error: %s); trying them again in %.0fs (or at HUP)",
                      tasks, policy.max_crashes, policy.crash_window, code,
                      slot.last_error or "see the log above", policy.failed_retry)
            if self.exit_on_task_failure:
                self.exit_code = 3
                self.stopping = "warm"
        elif outcome == CRASHED:
            log.error("child %d (tasks %s) died with code %s; restarting in %.1fs from the last "
                      "processed offsets", slot.index, tasks, code, delay)

    def known_pids(self) -> List[int]:
        """Processes we started on purpose: children and the embedded broker."""
        pids = [s.pid for s in self.slots.values() if s.pid is not None]
        if self.embedded is not None and self.embedded.proc is not None:
            pids.append(self.embedded.proc.pid)
        if self.guard_pid is not None:
            pids.append(self.guard_pid)
        return pids  # type: ignore[return-value]

    def wait_for_guard(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.guard_pid is not None and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(self.guard_pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            time.sleep(0.02)

    def check_heartbeats(self) -> None:
        """A child silent for ``child_timeout`` is stuck: dump its traceback, kill it."""
        now = time.monotonic()
        for slot in self.slots.values():
            if slot.stop_overdue(now, self.shutdown_timeout):
                log.error("child %d (pid %s) did not stop within %.0fs; killing it",
                          slot.index, slot.pid, self.shutdown_timeout)
            silent = slot.silent_for(now)
            if silent > self.child_timeout:
                trace = collect_trace(slot)
                log.error("child %d (pid %s, tasks %s) sent no heartbeat for %.0fs; its "
                          "traceback:\n%s\nkilling it", slot.index, slot.pid,
                          ",".join(slot.tasks), silent, trace)
                slot.hung(now)

    def signal_all_children(self, sig: int) -> None:
        """Sends ``sig`` to every child now (TERM: a warm shutdown; KILL: a cold one, or a
        warm one that ran out of time)."""
        for slot in self.slots.values():
            slot.signal(sig)

    def read_children(self) -> None:
        for slot in list(self.slots.values()):
            try:
                self.read_child(slot)
            except ChannelClosed:
                pass  # exiting; reap() handles it

    def read_child(self, slot: ChildSlot) -> None:
        for offsets in slot.read():
            self.assignment.record_offsets(slot, offsets)
        self.metric_totals.add(slot.take_metric_deltas())

    def assign_timers(self) -> None:
        """Tells exactly one child to run the app's timers: the one hosting the lowest
        running task (:func:`choose_timer_owner`).  Re-sent to every new incarnation; the
        old owner is told to stop before the new one is told to start."""
        if not self.app.has_scheduled_work:
            return
        running = {i: s.tasks for i, s in self.slots.items()
                   if s.state == "running" and not s.retiring}
        held = [t for s in self.slots.values() for t in s.tasks]
        owner = choose_timer_owner(running, held)
        alive = [s for s in self.slots.values() if s.alive and s.channel is not None]
        for slot in sorted(alive, key=lambda s: s.index == owner):  # stops first
            if slot.run_timers(slot.index == owner) and slot.index == owner:
                log.info("child %d (tasks %s) runs the timers", slot.index, ",".join(slot.tasks))

    # -- status ---------------------------------------------------------------------
    def notify_ready(self) -> None:
        """READY=1 for systemd once the group is joined and every child runs."""
        if self._notified_ready or not self.assignment.joined:
            return
        if all(s.state == "running" for s in self.slots.values()):
            self.state = "running"
            self._notified_ready = True
            sdnotify.ready(status_line(self.slots.values()))
            log.info("ready: %s", status_line(self.slots.values()))

    def handle_request(self, command: str) -> Dict[str, object]:
        """A request on the status socket (``shardsup status``)."""
        if command == "status":
            self.latest_snapshot = self.snapshot()
            return self.latest_snapshot
        return {"error": f"unknown command {command!r}"}

    def snapshot(self) -> Dict[str, object]:
        """Everything ``shardsup status``, ``/status``, ``/metrics`` and ``/health`` show."""
        return snapshot(self.slots.values(), app_id=self.app.id, broker=self.bootstrap,
                        datadir=self.datadir, started_at=self.started_at, state=self.state,
                        group=self.member.group_state() if self.member is not None else None,
                        topology=self.topology, kinds=self.topic_kinds,
                        metrics=families(self.metric_totals,
                                         [(i, s.metrics) for i, s in self.slots.items() if s.alive],
                                         [self.member.commit_latency] if self.member else [],
                                         self.topology.task_id))

    # -- shutdown -------------------------------------------------------------------
    def shutdown(self) -> int:
        """Warm: children finish and report, we commit and leave.  Cold: kill, commit what
        was acknowledged, leave, exit non-zero."""
        mode = self.stopping
        self.state = "stopping"
        sdnotify.stopping(f"{mode} shutdown")
        log.info("%s shutdown: stopping %d children", mode, sum(s.alive for s in self.slots.values()))
        for slot in self.slots.values():
            slot.retire(time.monotonic(), signal.SIGTERM if mode == "warm" else None)
        deadline = time.monotonic() + self.shutdown_timeout
        while any(s.alive for s in self.slots.values()):
            if self.stopping == "cold" or time.monotonic() >= deadline:
                if mode == "warm" and self.stopping != "cold":
                    log.error("children still running after %.0fs; killing them", self.shutdown_timeout)
                self.stopping = mode = "cold"
                self.signal_all_children(signal.SIGKILL)
            self.sleep(0.05)
            while self.SIG_QUEUE:
                sig = self.SIG_QUEUE.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                    self.stopping = "cold"
                elif sig == signal.SIGUSR1:
                    self.handle_usr1()  # a stuck shutdown is when a dump is wanted most
            self.read_children()
            self.reap()
            if self.member is not None:
                self.member.poll()
        self.assignment.commit_final()
        self.closing = True
        if self.member is not None:
            self.member.close()
        end_orphans(self.known_pids())
        self.reap()
        log.info("%s shutdown complete; committed %s", mode,
                 ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(self.assignment.committed.items())) or "nothing")
        return self.exit_code if mode == "warm" else 1
