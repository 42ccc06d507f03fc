"""The child's table state: one LMDB store per task, opened when the task is assigned
(restored from the changelog when it is missing or behind: :mod:`shardworker.restore`),
committed after each batch's changelog records are acknowledged, and closed when the task
goes (DESIGN.md, "State (LMDB)").

The worker calls, per batch, :meth:`TaskStates.drain` (write caches → changelog records,
produced at once), then flushes the producer, then :meth:`TaskStates.commit` (one LMDB
write transaction per task: state + input offsets + changelog offsets), and only then
reports the offsets.  :meth:`TaskStates.open` runs when a task is assigned.
"""
from __future__ import annotations

import logging
import os
from itertools import repeat
from typing import Any, Callable, Dict, Iterable, List, Optional

from confluent_kafka import Message, Producer

from .app import App
from .changelog import produce_batch
from .partitioner import key_partitioner
from .produce import RecordTooLarge, message_max_bytes, produce
from .restore import Restorer
from .store import TaskStore
from .tablecontext import CONTEXT, TableContext
from .batchend import DrainedBatch
from .tasktables import TaskTables
from .topology import TopicPartitionKey, source_key

# the state's lines keep the logger name they were always logged under
log = logging.getLogger("shardworker.state")

#: metadata key set when the task was revoked from this datadir (its copy may go stale)
META_RELEASED = "released"


class NoTables:
    """What a record of a partition whose task has no tables enters: no current record,
    so a table used by its agent raises :class:`~shardworker.tablecontext.NoCurrentRecordError`
    (not the previous record's task)."""

    def enter(self, msg: Any, source: TopicPartitionKey, event_ms: Optional[int] = None,
              ctx: TableContext = CONTEXT) -> None:
        ctx.clear()


NO_TABLES = NoTables()


def task_dir(datadir: str, app_id: str, task: str) -> str:
    """``<datadir>/<app>/tasks/<task>``: one LMDB environment per task."""
    return os.path.join(datadir, app_id, "tasks", task)


class TaskStates:
    """The tables of every task this child holds."""

    def __init__(self, app: App, datadir: str, consumer_config: Dict[str, Any],
                 producer_for: Callable[[str], Producer], heartbeat: Callable[[], None],
                 delivery_errors: List[str]) -> None:
        self.app = app
        self.datadir = datadir
        self.consumer_config = consumer_config
        #: the producer a task's changelog records go to (exactly-once: its transaction's)
        self.producer_for = producer_for
        #: the worker's list of failed deliveries: a lost changelog record fails the batch
        self.delivery_errors = delivery_errors
        self.topology = app.topology
        #: what the producer accepts (``kafka_config``): each changelog record must fit
        self.max_message_bytes = message_max_bytes(app.settings["kafka_config"])
        self.tasks: Dict[str, TaskTables] = {}
        #: late records of tasks' earlier openings in this process (late_counts adds them)
        self._late_closed: Dict[str, Dict[str, int]] = {}
        self.by_partition: Dict[TopicPartitionKey, TaskTables] = {}
        self._cluster_id: Optional[str] = None
        #: partitions per sub-topology (of its leader topic): the tables' key partitioner
        self._partitions: Dict[int, int] = {}
        self.restorer = Restorer(app, consumer_config, heartbeat)

    @property
    def enabled(self) -> bool:
        return bool(self.app.tables)

    def holds_tables(self, task: str) -> bool:
        """True when ``task``'s sub-topology has tables (a task without any has no store)."""
        return bool(self.topology.subtopology(task).tables)

    @property
    def restoring(self) -> bool:
        """True while a task's tables are being restored."""
        return self.restorer.restoring

    # -- tasks come and go ----------------------------------------------------------
    def open(self, task: str, starts: Dict[TopicPartitionKey, int],
             should_stop: Optional[Callable[[], bool]] = None) -> Dict[TopicPartitionKey, int]:
        """Opens the task's store, brings it up to date from the changelog where needed
        and returns the offset to read each of its source partitions from (DESIGN.md,
        "State (LMDB)"):

        * local state at the group's position (``starts``): nothing to do;
        * behind it, or missing: restore the changelog records written since the
          store's last changelog offsets (only what is missing), read from there;
        * ahead of it (a killed child's batches committed to LMDB but not yet to the
          group), or the group has no offset (a reset, retention): when nobody else has
          written the changelog since (see :meth:`Restorer._changelog_moved
          <shardworker.restore.Restorer._changelog_moved>`), the state is
          exact: keep it and read from its own input offset, restoring nothing.  When
          the changelog moved and the group has an offset, rebuild from the changelog
          up to it; when it has none, apply what is newer in the changelog and read
          from the position the state then reflects.

        ``should_stop()`` is asked during a restore (the supervisor revoked the task or
        stops the child): the restore stops with :class:`RestoreInterrupted`, its
        progress per changelog partition kept for the next time."""
        sub = self.topology.subtopology(task)
        if self._cluster_id is None or sub.index not in self._partitions:
            self._learn_cluster(sub.index, sub.leader)
        tables = [t for t in self.app.tables if t.name in sub.tables]
        # no fsync per commit: LMDB stays consistent after a machine crash, only its last
        # commits may be gone, and state behind the group's offset is restored from the
        # changelog (Kafka keeps it durable), so exactness never rests on this disk
        store = TaskStore(task_dir(self.datadir, self.app.id, task), [t.name for t in tables],
                          sync=False)
        try:
            resume = self.restorer.bring_up_to_date(task, store, tables, starts,
                                                    self._cluster_id or "", should_stop)
        except BaseException:
            store.close()
            raise
        store.set_meta(META_RELEASED, None)  # the task is this datadir's now
        partition = int(task.partition("_")[2])
        tables_of_task = TaskTables(store, tables, partition, sub.leader,
                                    key_partitioner(self.app.topics[sub.leader].encode_key,
                                                    self._partitions[sub.index]), task,
                                    self.max_message_bytes)
        self.tasks[task] = tables_of_task
        for tp in starts:
            self.by_partition[source_key(*tp)] = tables_of_task
        return resume

    def close(self, task: str, released: bool = False) -> None:
        """Closes the task's store; ``released``: the task was revoked, so its copy here
        is marked stale for ``shardsup table`` (it may move to another machine)."""
        tables = self.tasks.pop(task, None)
        if tables is not None:
            closed = self._late_closed.setdefault(task, {})
            for table, count in tables.late.items():
                closed[table] = closed.get(table, 0) + count
            self.by_partition = {k: v for k, v in self.by_partition.items() if v is not tables}
            if released:
                tables.abort()
                tables.store.set_meta(META_RELEASED, b"1")
            tables.close()

    def close_all(self) -> None:
        for task in list(self.tasks):
            self.close(task)
        self.restorer.close()

    def _learn_cluster(self, sub: int, leader: str) -> None:
        metadata = self.restorer.metadata(leader)
        self._cluster_id = metadata.cluster_id or ""
        self._partitions[sub] = len(metadata.topics[leader].partitions)

    # -- per record and per batch ---------------------------------------------------
    def tables_for(self, sources: Iterable[TopicPartitionKey]) -> Iterable[Any]:
        """The tables that each of a chunk's records (by ``(topic, partition)``) enters
        when its agent takes it (what :data:`~shardworker.stream.QueuedRecord` carries):
        its task's, :data:`NO_TABLES` for a partition without any, None for every
        record when the app has no tables."""
        if not self.enabled:
            return repeat(None)
        return map(self.by_partition.get, sources, repeat(NO_TABLES))

    def drain(self, positions: Dict[TopicPartitionKey, int]) -> List[DrainedBatch]:
        """Ends the batch for every task it touched: produces one changelog record per
        changed key (offsets come back in delivery reports) and returns what to commit."""
        CONTEXT.clear()
        touched: Dict[str, Dict[TopicPartitionKey, int]] = {}
        for tp, offset in positions.items():
            tables = self.by_partition.get(tp)
            if tables is not None:
                touched.setdefault(tables.task_id, {})[tp] = offset
        batches = []
        for task, offsets in touched.items():
            tables = self.tasks[task]
            batch = tables.drain(offsets)
            producer = self.producer_for(task)
            produce_batch(producer, batch, self.delivery_errors)
            for final in batch.finals:  # windows the batch closed (on_close)
                try:
                    produce(producer, final.topic, final.value, final.key)
                except RecordTooLarge as exc:  # it can never be sent: no crash loop
                    log.error("task %s: the final record of a window of %s is dropped: %s",
                              task, final.topic, exc)
            batches.append(batch)
        return batches

    def late_counts(self) -> Dict[str, Dict[str, int]]:
        """Late records per task and table in this process (writes to closed windows, not
        applied): a count that only grows, across a task's closing and reopening."""
        counts = {task: dict(per) for task, per in self._late_closed.items()}
        for task, tables in self.tasks.items():
            per = counts.setdefault(task, {})
            for table, count in tables.late.items():
                per[table] = per.get(table, 0) + count
        return {task: per for task, per in counts.items() if per}

    def dirty_keys(self) -> int:
        """Keys changed in every task's write cache since the last drain."""
        return sum(tables.dirty_keys() for tables in self.tasks.values())

    def commit(self, batches: List[DrainedBatch]) -> None:
        """After the acknowledgements: each task's state and offsets in one transaction."""
        for batch in batches:
            batch.commit()

    def rollback_record(self, msg: Message) -> None:
        """``msg`` failed: its table writes are taken back, if it is the record in hand
        (one that failed to decode, or to be forwarded, never was: the record in hand
        then is an earlier one, whose writes stand)."""
        task = CONTEXT.task
        if (task is not None and CONTEXT.offset == msg.offset()
                and CONTEXT.partition == msg.partition() and CONTEXT.topic == msg.topic()):
            task.rollback_record()

    def abort(self, task: Optional[str] = None) -> None:
        """Batches failed before their commit: forget what they changed (in ``task``, or
        in every task)."""
        for name, tables in self.tasks.items():
            if task is None or name == task:
                tables.abort()
