"""The worker's side of its conversation with the supervisor: the control messages it
acts on between batches, a task's arrival (restoring its tables) and departure, and the
reports it sends (offsets; every second a heartbeat with stats, lag and metrics).

:class:`SupervisorLink` is a part of :class:`~shardworker.worker.Worker` (which inherits
it), kept apart so that ``worker.py`` holds the record path and little else; it reads the
worker's fields (positions, state, committer, consumer, channel).
"""
from __future__ import annotations

import base64
import logging
import select
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from confluent_kafka import KafkaException, TopicPartition

from .beginning import assignable
from .logs import set_role
from .protocol import (Assign, ChannelClosed, Group, Offsets, Revoke, Revoked, Stats, Stop,
                       Timers, lag_total)
from .topology import TopicPartitionKey, task_sort_key

# the lines keep the logger name they were always logged under
log = logging.getLogger("shardworker.worker")

STATS_INTERVAL = 1.0       # seconds between heartbeats with stats to the supervisor
REPORT_INTERVAL = 0.05     # offsets are reported at most this often (and at every stop)
LEADERS_TIMEOUT = 2.0      # seconds an assign waits for partition leaders (then goes on)


class SupervisorLink:
    """Control messages in, task arrivals and departures, reports out (see the module
    docstring).  Attributes are the :class:`~shardworker.worker.Worker`'s."""

    # set by the worker
    channel: Any
    control: Any
    stopping: bool

    def handle_control(self, timeout: float) -> None:
        """Acts on the supervisor's messages, in the order they came; called only between
        batches.  Those that arrive while an ``assign`` restores a task wait in
        :attr:`control`, where the restore looks for a ``stop`` or ``revoke``."""
        if timeout and not self.control and not select.select([self.channel], [], [], timeout)[0]:
            return
        self.control.extend(self.channel.receive())
        while self.control:
            message = self.control.popleft()
            if isinstance(message, Assign):
                self.assign(message.partitions)
            elif isinstance(message, Revoke):
                self.revoke(message.partitions)
            elif isinstance(message, Stop):
                self.stopping = True
            elif isinstance(message, Group):
                self.committer.set_group_metadata(base64.b64decode(message.metadata))
            elif isinstance(message, Timers):
                self.runs_timers = message.run
                self.jobs.role(message.run, time.time())

    def assign(self, partitions: List[List[Any]]) -> None:
        """Starts reading ``[topic, partition, offset]``: from where the committer says
        (exactly-once: the group's committed offsets, once the tasks' previous owners are
        fenced), or further on, where a task's local state is ahead (:meth:`_open_tasks`)."""
        partitions = self.committer.starts(partitions, lambda: self.settle(block=True))
        if self.state.enabled:
            partitions = self._open_tasks(partitions)
        tps = [assignable(topic, part, offset) for topic, part, offset in partitions]
        if any(tp.offset < 0 for tp in tps):
            self._learn_leaders({tp.topic for tp in tps})
        if tps:
            self.consumer.incremental_assign(tps)
        for topic, part, _offset in partitions:
            self.positions.setdefault((topic, part), _offset)
        self._tasks_changed()
        log.info("assigned %s", ", ".join(f"{t}[{p}]@{o}" for t, p, o in partitions))

    def _learn_leaders(self, topics: Set[str]) -> None:
        """Asks for the leaders of the partitions of ``topics`` before they are assigned
        at a logical offset (the group has none for them): librdkafka looks such an
        offset up only once it knows the partition's leader, and when it does not know
        it yet, tries again 0.5 s later (one child start in two, on a new group)."""
        for topic in sorted(topics):
            try:
                self.consumer.list_topics(topic, timeout=LEADERS_TIMEOUT)
            except KafkaException:
                return  # the broker is away: librdkafka finds the leaders itself, later

    def _open_tasks(self, partitions: List[List[Any]]) -> List[List[Any]]:
        """Opens (restoring where needed) the tables of each assigned task and returns
        the partitions to assign, each from where its task's state says to read (its own
        input offset when it is ahead of the group's and still exact: DESIGN.md, "State
        (LMDB)").  A task whose restore the supervisor interrupted (a revoke of it, a
        stop) is left out: its progress is kept for the next time."""
        from .restore import RestoreInterrupted

        given = {(t, p): o for t, p, o in partitions}
        starts: Dict[TopicPartitionKey, int] = {}
        dropped = set()
        for task, tps in self.topology.group_by_task(given).items():
            if not self.state.holds_tables(task):
                continue
            self._tasks_changed(restoring=True)
            try:
                starts.update(self.state.open(
                    task, {tp: given[tp] for tp in tps},
                    should_stop=lambda tps=tps: self._told_to_let_go(tps)))
            except RestoreInterrupted:
                dropped.add(task)
        return [[t, p, starts.get((t, p), o)] for t, p, o in partitions
                if self.topology.task_id(t, p) not in dropped]

    def _told_to_let_go(self, partitions: List[TopicPartitionKey]) -> bool:
        """During a restore: True when the child is stopping, the supervisor has gone, or
        its messages (received so far, in :attr:`control`) hold a ``stop`` or a
        ``revoke`` of one of the task's ``partitions``.  The messages stay queued for
        :meth:`handle_control`, which acts on them, in order, once the restore is over."""
        if self.stopping:
            return True
        try:
            self.control.extend(self.channel.receive())
        except ChannelClosed:
            return True  # handle_control sees it next and the child exits
        wanted = [list(tp) for tp in partitions]
        return any(isinstance(m, Stop) or (isinstance(m, Revoke) and any(
            tp in m.partitions for tp in wanted)) for m in self.control)

    def revoke(self, partitions: List[List[Any]]) -> None:
        self.settle(block=True)
        keys = [(topic, part) for topic, part in partitions]
        # a task whose restore was interrupted was never assigned to the consumer
        assigned = [TopicPartition(t, p) for t, p in keys if (t, p) in self.positions]
        if assigned:
            self.consumer.incremental_unassign(assigned)
        final = {k: self.positions.pop(k) for k in keys if k in self.positions}
        tasks = list(self.topology.group_by_task(keys))
        for task in tasks:
            # marked released: `shardsup table` no longer shows this copy as current
            self.state.close(task, released=True)
        self.committer.released(tasks)
        for key in keys:
            self._reported.pop(key, None)
        self.channel.send(Revoked(self._offsets_list(final)))
        self._tasks_changed()
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in keys))

    def _tasks_changed(self, restoring: bool = False) -> None:
        self.tasks = sorted(self.topology.group_by_task(self.positions), key=task_sort_key)
        if restoring:
            self.channel.send(Stats(self.processed, self.errors, self.tasks, {}, restoring=True))
        label = ",".join(self.tasks) or "idle"
        set_role(f"child {label}")
        try:
            from setproctitle import setproctitle

            setproctitle(f"shardsup: {self.app.id} child {label}")
        except ImportError:  # pragma: no cover - a declared dependency
            pass

    def report(self, force: bool) -> None:
        """Sends changed offsets (throttled) and, every second, a heartbeat with stats."""
        now = time.monotonic()
        if force or now - self._last_report >= REPORT_INTERVAL:
            changed = {k: v for k, v in self.positions.items()
                       if v >= 0 and self._reported.get(k) != v}
            if changed:
                self.channel.send(Offsets(self._offsets_list(changed)))
                self._reported.update(changed)
            self._last_report = now
        if now - self._last_stats >= STATS_INTERVAL:
            restoring = self.state.restoring
            lag = {} if restoring else self.lag()
            self.channel.send(Stats(self.processed, self.errors, self.tasks,
                                    {task: lag_total(per) for task, per in lag.items()},
                                    restoring, topic_lag=lag, metrics=self.changed_metrics()))
            self._last_stats = now

    def changed_metrics(self) -> Dict[str, Dict[str, Any]]:
        """The app's metrics and shardsup's own whose series changed since the last
        heartbeat, with their cumulative values (:mod:`shardworker.metrics`)."""
        for task, count in getattr(self.state.restorer, "restored", {}).items():
            if self.restored_by.value(task) != count:
                self.restored_by._set_total((task,), count)
        for task, per_table in (self.state.late_counts() if self.state.enabled else {}).items():
            for table, count in per_table.items():
                seen = self._late_seen.get((task, table), 0)
                if count > seen:
                    self.late_by._inc((task, table), count - seen)
                    self._late_seen[(task, table)] = count
        return {**self.app.metrics.changed(), **self.own_metrics.changed()}

    def lag(self) -> Dict[str, Dict[str, Optional[int]]]:
        """Records behind the end of each task's partition of each of its topics (task →
        topic → records).  The end is the high watermark of the last fetch response (right
        on Kafka and tansu alike; tansu's ListOffsets is not), so it is unknown (None)
        until a first fetch answered."""
        lags: Dict[str, Dict[str, Optional[int]]] = {}
        for task, parts in self.topology.group_by_task(self.positions).items():
            per: Dict[str, Optional[int]] = {}
            lags[task] = per
            for topic, part in parts:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, part),
                                                                cached=True)
                position = self.positions[(topic, part)]
                per[topic] = (None if high < 0 else
                              max(0, high - (position if position >= 0 else max(low, 0))))
        return lags

    @staticmethod
    def _offsets_list(offsets: Dict[TopicPartitionKey, int]) -> List[Tuple[str, int, int]]:
        return [(topic, part, off) for (topic, part), off in offsets.items() if off >= 0]
