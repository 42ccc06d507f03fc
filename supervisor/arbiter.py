"""The supervisor's main loop, in the manner of gunicorn's arbiter.

Signals are queued by tiny handlers and the loop is woken through a self-pipe; each
signal has its own ``handle_<name>`` method.  ``spawn``, ``reap`` and ``murder`` are the
only places where children are started, collected and killed.
"""
from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import logging
import os
import select
import signal
import time
from typing import Dict, List, Optional, Sequence

from confluent_kafka import KafkaException

from shardworker.app import EMBEDDED, App, bootstrap_servers
from shardworker.protocol import EXIT_BROKER_UNAVAILABLE, ChannelClosed
from shardworker.topology import TopicPartitionKey, group_by_task, task_partitions

from .broker import EmbeddedBroker, check_reachable, ensure_topics
from .children import FAILED_RETRY, ChildSlot
from .descendants import end_orphans
from .dump import collect_trace, dump_report, latest_dump_path, trace_path
from .membership import GroupMember
from . import sdnotify
from .guard import start_guard
from .pidfile import PidFile
from .placement import choose_timer_owner, place_tasks
from .status import StatusServer
from .web import WebServer

log = logging.getLogger("supervisor")

PR_SET_CHILD_SUBREAPER = 36
SNAPSHOT_EVERY = 1.0  # seconds between refreshes of the snapshot the web thread serves
PLACE_RETRY = 2.0     # seconds between tries to learn the start offsets of new partitions
COMMIT_RESEND = 10.0  # seconds before unconfirmed asynchronous commits are sent again
LOST_GRACE = 5.0      # seconds a child may take to give back partitions the group lost
FINAL_COMMIT_WAIT = 10.0  # seconds a shutdown waits for the broker to confirm its commit


def make_private() -> None:
    """Every file and folder this process and its children create is private to the
    user (0600 files, 0700 folders: LMDB state, logs, dumps, traces, the pid file, the
    status socket), whatever the umask of the shell or service manager that started us:
    the state holds the app's data (DESIGN.md, "State (LMDB)").  Children inherit it."""
    os.umask(0o077)


def status_socket_path(datadir: str) -> str:
    return os.path.join(datadir, "supervisor.sock")


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
        self.max_crashes = max_crashes
        self.crash_window = crash_window
        self.exit_on_task_failure = exit_on_task_failure
        self.failed_retry = failed_retry
        self.exit_code = 0
        self.web_host = web_host
        self.web_port = web_port
        self.log_args = list(log_args)
        self.started_at = time.monotonic()
        self.state = "starting"          # starting, running, stopping (for status)
        self.joined = False
        self.status_server: Optional[StatusServer] = None
        self.web: Optional[WebServer] = None
        self.latest_snapshot: Dict[str, object] = {}
        self._last_snapshot = 0.0
        self._watchdog_every = sdnotify.watchdog_interval()
        self._last_watchdog = 0.0
        self._notified_ready = False
        self._last_status_line = ""
        self.source_topics = app.source_topics
        self.SIG_QUEUE: List[int] = []
        self.PIPE: List[int] = []
        self.slots: Dict[int, ChildSlot] = {}
        #: per partition: next offset to read, as reported by the children (acknowledged work)
        self.offsets: Dict[TopicPartitionKey, int] = {}
        self.committed: Dict[TopicPartitionKey, int] = {}
        #: assigned partitions whose start offsets the broker has not answered yet
        self.unplaced: List[TopicPartitionKey] = []
        self._next_placement = 0.0
        self._last_commit = 0.0
        self._commit_sent: Dict[TopicPartitionKey, int] = {}  # asynchronous, unconfirmed
        self._commit_sent_at = 0.0
        #: exactly-once: the group metadata the children have (their transactions need it)
        self._shared_metadata: Optional[bytes] = None
        self.stopping: Optional[str] = None   # None, "warm" or "cold"
        self.closing = False
        self.embedded: Optional[EmbeddedBroker] = None
        self.bootstrap = ""
        self.member: Optional[GroupMember] = None
        self.pidfile = PidFile(datadir)
        self.guard_fd: Optional[int] = None
        self.guard_pid: Optional[int] = None

    # -- start-up -------------------------------------------------------------------
    def run(self) -> int:
        """Runs until a shutdown signal; returns the exit code."""
        make_private()
        self.pidfile.acquire()
        self.init_signals()
        try:
            self.set_subreaper()
            # before any thread or Kafka client exists: the guard forks without exec
            self.guard_pid, self.guard_fd = start_guard()
            self.status_server = StatusServer(status_socket_path(self.datadir), self.handle_request)
            if self.web_port is not None:
                self.web = WebServer(self.web_host, self.web_port, lambda: self.latest_snapshot)
                self.web.start()
            self.start_broker()
            cluster = check_reachable(self.app, self.bootstrap)
            partitions = ensure_topics(self.app, self.bootstrap)
            log.info("app %s on %s (cluster %s): sources %s, up to %d children, %s",
                     self.app.id, self.bootstrap, cluster or "?",
                     ", ".join(f"{t}[{partitions[t]}]" for t in self.source_topics),
                     self.max_children, self.app.settings["processing_guarantee"])
            self.member = GroupMember(self.app, self.bootstrap, self.on_assign,
                                      self.on_revoke, self.on_lost)
            self.member.subscribe(self.source_topics)
            self.set_title("supervisor")
            while self.stopping is None:
                self.loop_once()
            return self.shutdown()
        finally:
            if self.guard_fd is not None:
                os.close(self.guard_fd)  # the guard sweeps (nothing left by now) and exits
                self.wait_for_guard()
            if self.web is not None:
                self.web.stop()
            if self.status_server is not None:
                self.status_server.close()
            if self.embedded is not None:
                self.embedded.stop()
            self.pidfile.release()

    def loop_once(self) -> None:
        self.sleep(0.1)
        self.notify_ready()
        while self.SIG_QUEUE and self.stopping is None:
            self.dispatch(self.SIG_QUEUE.pop(0))
        self.read_children()
        assert self.member is not None
        self.member.poll()
        self.place_unplaced()
        self.share_group_metadata()
        self.spawn_due()
        self.assign_timers()
        self.check_heartbeats()
        self.commit(force=False)

    def start_broker(self) -> None:
        if self.broker_url.startswith(EMBEDDED):
            self.embedded = EmbeddedBroker()
            self.embedded.start()
            self.bootstrap = self.embedded.bootstrap
            log.info("embedded broker (tansu) listening on %s — in memory only: its topics "
                     "and offsets are lost when shardsup stops", self.bootstrap)
        else:
            self.bootstrap = bootstrap_servers(self.broker_url)

    @staticmethod
    def set_subreaper() -> None:
        """Orphaned descendants (double-forked by user code) become ours to reap."""
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            pass

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
            line = self.status_line()
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
            slot.crashes.clear()
            if slot.alive:
                slot.state = "stopping"
                slot.stop_requested = time.monotonic()
                slot.signal(signal.SIGTERM)  # reaped, then spawned again at once
            elif slot.state == "failed":
                slot.state = "down"
                slot.respawn_at = time.monotonic()

    def handle_usr1(self) -> None:
        """Tracebacks of every thread of the supervisor and of every child, with each
        child's tasks and offsets, in one report: logged and written under the datadir."""
        report = dump_report(self)
        log.warning("traceback report (also in %s):\n%s", latest_dump_path(self.datadir), report)

    # -- children -------------------------------------------------------------------
    def spawn(self, slot: ChildSlot) -> None:
        """Starts the process of a slot and hands it its tasks with their start offsets."""
        slot.spawn(self.app_spec, self.bootstrap, self.loglevel, trace_path(self.datadir, slot.index),
                   self.log_args, self.datadir)
        log.info("started child %d (pid %d) for tasks %s", slot.index, slot.pid, ",".join(slot.tasks))
        if self.app.exactly_once:
            self.send_group_metadata([slot])
        self.send_assign(slot, slot.tasks)

    def send_assign(self, slot: ChildSlot, tasks: List[str]) -> None:
        parts = [(t, p, self.offsets[(t, p)]) for task in tasks
                 for t, p in task_partitions(self.source_topics, task)]
        slot.send("assign", partitions=parts)

    def spawn_due(self) -> None:
        now = time.monotonic()
        for slot in list(self.slots.values()):
            if slot.retry_due(now):
                log.warning("tasks %s: trying them again %.0fs after they failed (last error: %s)",
                            ",".join(slot.tasks), self.failed_retry, slot.last_error)
                slot.respawn_at = now
            if slot.state == "down" and slot.respawn_at is not None and now >= slot.respawn_at:
                slot.restarts += 1
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
        planned = slot.state == "stopping"
        try:
            self.read_child(slot)  # its last offsets may still be in the socket
        except ChannelClosed:
            pass
        slot.exited()
        # what the child started goes with it (double-forked helpers were adopted by us)
        end_orphans(self.known_pids(), token=slot.token)
        if slot.retiring or not slot.tasks:
            del self.slots[slot.index]
            log.info("child %d exited (code %s)", slot.index, code)
            return
        if self.stopping is not None:
            return
        if planned and (code == 0 or slot.revoking):
            log.info("child %d restarted (tasks %s)", slot.index, ",".join(slot.tasks))
            slot.respawn_at = time.monotonic()
            return
        slot.note_exit(code)
        now = time.monotonic()
        if code == EXIT_BROKER_UNAVAILABLE:
            delay = slot.schedule_outage_restart(now)
            log.warning("child %d (tasks %s) stopped: the broker is unreachable (%s); "
                        "restarting in %.1fs (an outage is not counted as a crash)",
                        slot.index, ",".join(slot.tasks), slot.last_error, delay)
            return
        delay = slot.schedule_restart(now, self.max_crashes, self.crash_window)
        if delay is not None and slot.hangs >= self.max_crashes and slot.last_error \
                and slot.last_error.startswith("no heartbeat"):
            delay = None
        if delay is None:
            slot.fail(now, self.failed_retry)
            log.error("tasks %s FAILED: their child crashed %d times within %.0fs (last exit "
                      "code %s, last error: %s); trying them again in %.0fs (or at HUP)",
                      ",".join(slot.tasks), self.max_crashes, self.crash_window, code,
                      slot.last_error or "see the log above", self.failed_retry)
            if self.exit_on_task_failure:
                self.exit_code = 3
                self.stopping = "warm"
            return
        log.error("child %d (tasks %s) died with code %s; restarting in %.1fs from the last "
                  "processed offsets", slot.index, ",".join(slot.tasks), code, delay)

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
            if slot.state == "stopping" and now - slot.stop_requested > self.shutdown_timeout:
                log.error("child %d (pid %s) did not stop within %.0fs; killing it",
                          slot.index, slot.pid, self.shutdown_timeout)
                slot.signal(signal.SIGKILL)
                slot.stop_requested = now
            if slot.state in ("starting", "running") and now - slot.last_heard > self.child_timeout:
                trace = collect_trace(slot)
                log.error("child %d (pid %s, tasks %s) sent no heartbeat for %.0fs; its "
                          "traceback:\n%s\nkilling it", slot.index, slot.pid,
                          ",".join(slot.tasks), now - slot.last_heard, trace)
                slot.last_error = f"no heartbeat for {now - slot.last_heard:.0f}s"
                slot.error_reported = True
                # hangs with no progress in between count toward failure, however long
                # each incarnation lived (the crash window alone would never see them)
                slot.hangs = slot.hangs + 1 if slot.records_total == slot.records_at_hang else 1
                slot.records_at_hang = slot.records_total
                slot.signal(signal.SIGKILL)
                slot.last_heard = now  # one kill; reap() handles the exit

    def murder(self, sig: int = signal.SIGKILL) -> None:
        """Kills every child now (cold shutdown, or a warm one that ran out of time)."""
        for slot in self.slots.values():
            slot.signal(sig)

    def read_children(self) -> None:
        for slot in list(self.slots.values()):
            try:
                self.read_child(slot)
            except ChannelClosed:
                pass  # exiting; reap() handles it

    def read_child(self, slot: ChildSlot) -> None:
        if slot.channel is None:
            return
        for message in slot.channel.receive():
            slot.last_heard = time.monotonic()
            op = message["op"]
            if op in ("offsets", "revoked", "bye"):
                self.record_offsets(slot, message["offsets"])
                if op == "revoked":
                    slot.revoking = False
            elif op == "ready":
                if slot.state == "starting":
                    slot.state = "running"
            elif op == "stats":
                slot.record_stats(message)
            elif op == "failed":
                slot.last_error = message.get("error")
                slot.error_reported = True

    def assign_timers(self) -> None:
        """Tells exactly one child to run the app's timers: the one hosting the lowest
        running task (:func:`choose_timer_owner`).  Re-sent to every new incarnation; the
        old owner is told to stop before the new one is told to start."""
        if not self.app.timers:
            return
        running = {i: s.tasks for i, s in self.slots.items()
                   if s.state == "running" and not s.retiring}
        held = [t for s in self.slots.values() for t in s.tasks]
        owner = choose_timer_owner(running, held)
        alive = [s for s in self.slots.values() if s.alive and s.channel is not None]
        for slot in sorted(alive, key=lambda s: s.index == owner):  # stops first
            wanted = slot.index == owner
            if slot.runs_timers != wanted:
                slot.send("timers", run=wanted)
                slot.runs_timers = wanted
                if wanted:
                    log.info("child %d (tasks %s) runs the timers", slot.index, ",".join(slot.tasks))

    def record_offsets(self, slot: ChildSlot, offsets: List[List[object]]) -> None:
        owned = set(slot.tasks)
        for topic, part, offset in offsets:
            key = (str(topic), int(part))  # type: ignore[call-overload]
            tasks = group_by_task(self.source_topics, [key])
            if key in self.offsets and owned.intersection(tasks) and int(offset) >= self.offsets[key]:  # type: ignore[call-overload]
                self.offsets[key] = int(offset)  # type: ignore[call-overload]

    # -- offsets --------------------------------------------------------------------
    def commit(self, force: bool) -> None:
        """Commits the children's processed offsets as the group member (throttled).
        Exactly-once: the children's transactions committed them before reporting them;
        a commit from here could land after a newer transactional one and undo it.

        The periodic commit does not wait for the broker (an outage must not stop this
        loop: issue 11, point 7); what it confirms is taken on later turns, and what it
        does not confirm is sent again after COMMIT_RESEND.  ``force`` (a revoke, the
        shutdown) waits for the broker's answer."""
        now = time.monotonic()
        if self.member is not None:
            confirmed = self.member.take_acknowledged()
            self.committed.update({k: o for k, o in confirmed.items() if k in self.offsets})
        if not force and now - self._last_commit < self.app.settings["commit_interval"]:
            return
        self._last_commit = now
        pending = {k: o for k, o in self.offsets.items() if o >= 0 and self.committed.get(k) != o}
        if not pending or self.member is None:
            return
        if self.app.exactly_once:
            self.committed.update(pending)
        elif force:
            if self.member.commit(pending):
                self.committed.update(pending)
        elif pending != self._commit_sent or now - self._commit_sent_at >= COMMIT_RESEND:
            self.member.commit_soon(pending)
            self._commit_sent, self._commit_sent_at = pending, now

    def commit_final(self) -> None:
        """The shutdown's commit: waits for the broker's confirmation, but at most
        FINAL_COMMIT_WAIT seconds, so a shutdown during an outage still ends (what is
        not confirmed is read again by the next owner: at least once)."""
        if self.member is None or self.app.exactly_once:
            self.commit(force=True)
            return
        self.committed.update(self.member.take_acknowledged())
        pending = {k: o for k, o in self.offsets.items() if o >= 0 and self.committed.get(k) != o}
        if not pending:
            return
        if self.member.commit_within(pending, FINAL_COMMIT_WAIT):
            self.committed.update(pending)
        else:
            log.warning("the broker did not confirm the final commit within %.0fs; records "
                        "after the group's last committed offsets will be read again",
                        FINAL_COMMIT_WAIT)

    def share_group_metadata(self) -> None:
        """Exactly-once: sends every child the member's group metadata when it changes
        (each rebalance starts a generation; a stale one gets their commits refused)."""
        if not self.app.exactly_once or self.member is None or not self.joined:
            return
        metadata = self.member.group_metadata()
        if metadata != self._shared_metadata:
            self._shared_metadata = metadata
            self.send_group_metadata([slot for slot in self.slots.values() if slot.alive])

    def send_group_metadata(self, slots: List[ChildSlot]) -> None:
        assert self.member is not None
        encoded = base64.b64encode(self.member.group_metadata()).decode()
        for slot in slots:
            slot.send("group", metadata=encoded)

    # -- rebalances (called by librdkafka from inside member.poll) -----------------
    def on_assign(self, partitions: List[TopicPartitionKey]) -> None:
        self.joined = True
        if not partitions or self.stopping:
            return  # shutting down: member.close() gives them back
        self.unplaced.extend(p for p in partitions if p not in self.unplaced)
        self._next_placement = 0.0
        self.place_unplaced()

    def place_unplaced(self) -> None:
        """Starts the tasks of newly assigned partitions once the group's start offsets
        are known.  The broker may not answer (an outage, a transaction still open): that
        is logged and tried again on a later loop turn, never raised, because this runs
        inside librdkafka's rebalance callback and an exception there would end the
        supervisor (issue 11, point 7)."""
        if not self.unplaced or self.stopping or self.member is None:
            return
        now = time.monotonic()
        if now < self._next_placement:
            return
        try:
            offsets = self.member.start_offsets(self.unplaced)
        except KafkaException as exc:
            self._next_placement = time.monotonic() + PLACE_RETRY
            log.warning("start offsets of tasks %s not available (%s); trying again in %.0fs",
                        ",".join(group_by_task(self.source_topics, self.unplaced)), exc, PLACE_RETRY)
            return
        partitions, self.unplaced = self.unplaced, []
        self.offsets.update(offsets)
        self.place(partitions)

    def place(self, partitions: List[TopicPartitionKey]) -> None:
        """Hands the tasks of ``partitions`` (start offsets known) to children."""
        tasks = list(group_by_task(self.source_topics, partitions))
        log.info("assigned tasks %s", ",".join(tasks))
        # a failed slot takes no new work: its tasks wait for their retry (or a HUP)
        # (nor does one that is retiring: it is on its way out with whatever it holds)
        hosted = {i: s.tasks for i, s in self.slots.items()
                  if s.state != "failed" and not s.retiring}
        for_existing, for_new = place_tasks(tasks, hosted, self.max_children)
        for index, new in for_existing.items():
            slot = self.slots[index]
            slot.tasks.extend(new)
            if slot.alive:
                self.send_assign(slot, new)
        for new in for_new:
            index = next(i for i in range(len(self.slots) + 1) if i not in self.slots)
            slot = self.slots[index] = ChildSlot(index, new)
            self.spawn(slot)

    def on_revoke(self, partitions: List[TopicPartitionKey]) -> None:
        """Stops the revoked tasks (warm) and commits them before the group moves them."""
        self.take_back(partitions, commit=True)

    def on_lost(self, partitions: List[TopicPartitionKey]) -> None:
        """The group gave these away already (we were too slow): stop them, commit nothing."""
        log.warning("lost partitions %s", partitions)
        self.take_back(partitions, commit=False)

    def take_back(self, partitions: List[TopicPartitionKey], commit: bool) -> None:
        gone = set(partitions)
        self.unplaced = [p for p in self.unplaced if p not in gone]
        partitions = [p for p in partitions if p in self.offsets]  # only those placed
        if self.closing or not partitions:
            return
        if self.stopping:  # children are stopping anyway: keep what they reported, let go
            if commit:
                self.commit(force=True)
            for key in partitions:
                self.offsets.pop(key, None)
                self.committed.pop(key, None)
            return
        revoked = group_by_task(self.source_topics, partitions)
        log.info("revoking tasks %s", ",".join(revoked))
        waiting = []
        for slot in self.slots.values():
            mine = [t for t in slot.tasks if t in revoked]
            if not mine:
                continue
            if slot.alive:
                slot.revoking = True
                slot.send("revoke", partitions=[list(tp) for t in mine for tp in revoked[t]])
                waiting.append(slot)
        # lost partitions belong to someone else already, and a child that cannot give
        # them back is most likely waiting on the unreachable broker that lost them
        grace = self.shutdown_timeout if commit else min(self.shutdown_timeout, LOST_GRACE)
        deadline = time.monotonic() + grace
        while any(s.revoking and s.alive for s in waiting) and time.monotonic() < deadline:
            self.sleep(0.05)
            self.read_children()
            self.reap()
        for slot in waiting:
            if slot.revoking and slot.alive:
                # it must not go on with a task the group gives to someone else
                if commit:
                    log.error("child %d did not give back tasks within %.0fs; killing it",
                              slot.index, grace)
                else:  # not its fault: a planned stop, not a crash
                    log.warning("child %d did not give back lost tasks within %.0fs; killing "
                                "it (its uncommitted work is read again)", slot.index, grace)
                    slot.state = "stopping"
                slot.signal(signal.SIGKILL)
                while slot.alive:
                    self.sleep(0.05)
                    self.reap()
        if commit:
            self.commit(force=True)
        for slot in list(self.slots.values()):
            slot.tasks = [t for t in slot.tasks if t not in revoked]
            if not slot.tasks:
                slot.retiring = True
                if slot.alive:
                    slot.state = "stopping"
                    slot.stop_requested = time.monotonic()
                    slot.signal(signal.SIGTERM)
                else:
                    del self.slots[slot.index]
        for key in partitions:
            self.offsets.pop(key, None)
            self.committed.pop(key, None)

    # -- status ---------------------------------------------------------------------
    def notify_ready(self) -> None:
        """READY=1 for systemd once the group is joined and every child runs."""
        if self._notified_ready or not self.joined:
            return
        if all(s.state == "running" for s in self.slots.values()):
            self.state = "running"
            self._notified_ready = True
            sdnotify.ready(self.status_line())
            log.info("ready: %s", self.status_line())

    def status_line(self) -> str:
        """One line for systemd's STATUS= and the log."""
        running = sum(1 for s in self.slots.values() if s.state == "running")
        tasks = sum(len(s.tasks) for s in self.slots.values())
        failed = [t for s in self.slots.values() if s.state == "failed" for t in s.tasks]
        rate = sum(s.records_per_s for s in self.slots.values())
        line = f"{running}/{len(self.slots)} children running, {tasks} tasks, {rate:.0f} records/s"
        return line + (f", FAILED tasks {','.join(failed)}" if failed else "")

    def handle_request(self, command: str) -> Dict[str, object]:
        """A request on the status socket (``shardsup status``)."""
        if command == "status":
            self.latest_snapshot = self.snapshot()
            return self.latest_snapshot
        return {"error": f"unknown command {command!r}"}

    def snapshot(self) -> Dict[str, object]:
        """Everything ``shardsup status``, ``/status``, ``/metrics`` and ``/health`` show."""
        now = time.monotonic()
        children = []
        tasks: Dict[str, object] = {}
        for slot in sorted(self.slots.values(), key=lambda s: s.index):
            usage = slot.usage()
            lag = slot.stats.get("lag", {}) if slot.alive else {}
            state = "restoring" if slot.alive and slot.restoring else slot.state
            children.append({
                "index": slot.index, "pid": slot.pid, "tasks": list(slot.tasks), "state": state,
                "uptime_s": round(now - slot.started_at, 3) if slot.alive else 0.0,
                "restarts": slot.restarts, "records_per_s": round(slot.records_per_s, 1),
                "records_total": slot.records_total, "errors_total": slot.errors_total,
                "lag": {t: lag.get(t) for t in slot.tasks},
                "rss_bytes": usage[0], "cpu_percent": usage[1], "last_error": slot.last_error})
            retry_in = (round(max(0.0, slot.retry_at - now), 1)
                        if slot.state == "failed" and slot.retry_at is not None else None)
            children[-1]["retry_in_s"] = retry_in
            for task in slot.tasks:
                tasks[task] = {"child": slot.index, "state": state, "lag": lag.get(task)}
                if slot.state == "failed":
                    tasks[task].update(last_error=slot.last_error, retry_in_s=retry_in)
        group = self.member.group_state() if self.member is not None else {
            "state": "not joined", "generation": None, "member_id": None, "rebalances": 0}
        return {
            "supervisor": {"pid": os.getpid(), "app": self.app.id, "broker": self.bootstrap,
                           "datadir": os.path.abspath(self.datadir),
                           "uptime_s": round(now - self.started_at, 3), "state": self.state,
                           "group": group},
            "children": children, "tasks": tasks}

    # -- shutdown -------------------------------------------------------------------
    def shutdown(self) -> int:
        """Warm: children finish and report, we commit and leave.  Cold: kill, commit what
        was acknowledged, leave, exit non-zero."""
        mode = self.stopping
        self.state = "stopping"
        sdnotify.stopping(f"{mode} shutdown")
        log.info("%s shutdown: stopping %d children", mode, sum(s.alive for s in self.slots.values()))
        for slot in self.slots.values():
            slot.retiring = True
            if slot.alive:
                slot.state = "stopping"
                slot.stop_requested = time.monotonic()
        if mode == "warm":
            self.murder(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout
        while any(s.alive for s in self.slots.values()):
            if self.stopping == "cold" or time.monotonic() >= deadline:
                if mode == "warm" and self.stopping != "cold":
                    log.error("children still running after %.0fs; killing them", self.shutdown_timeout)
                self.stopping = mode = "cold"
                self.murder(signal.SIGKILL)
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
        self.commit_final()
        self.closing = True
        if self.member is not None:
            self.member.close()
        end_orphans(self.known_pids())
        self.reap()
        log.info("%s shutdown complete; committed %s", mode,
                 ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(self.committed.items())) or "nothing")
        return self.exit_code if mode == "warm" else 1
