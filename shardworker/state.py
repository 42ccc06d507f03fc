"""The child's table state: one LMDB store per task, restored from the changelog when it
is missing or behind, and committed after each batch's changelog records are
acknowledged (DESIGN.md, "State (LMDB)").

The worker calls, per batch, :meth:`TaskStates.drain` (write caches → changelog records,
produced at once), then flushes the producer, then :meth:`TaskStates.commit` (one LMDB
write transaction per task: state + input offsets + changelog offsets), and only then
reports the offsets.  :meth:`TaskStates.open` runs when a task is assigned.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

from .app import App
from .partitioner import key_partitioner
from .produce import message_max_bytes, produce
from .store import TaskStore
from .tables import (CONTEXT, DrainedBatch, TaskTables, apply_changelog, confirmed_of,
                     source_of)
from .topology import TopicPartitionKey

log = logging.getLogger("shardworker.state")

RESTORE_BATCH = 10_000  # records fetched per consume() call while restoring
#: changelog records per restore write transaction; each stores the changelog position
#: reached, so an interrupted restore goes on from there (see apply_changelog)
RESTORE_COMMIT_EVERY = 50_000
#: metadata key set when the task was revoked from this datadir (its copy may go stale)
META_RELEASED = "released"


class RestoreInterrupted(Exception):
    """A restore stopped because the task is revoked or the child stops; what it applied
    is kept, with its changelog offsets, and the next restore goes on from there."""


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
        self.heartbeat = heartbeat
        #: the worker's list of failed deliveries: a lost changelog record fails the batch
        self.delivery_errors = delivery_errors
        self.source = app.table_source or ""
        #: what the producer accepts (``kafka_config``): each changelog record must fit
        self.max_message_bytes = message_max_bytes(app.settings["kafka_config"])
        self.tasks: Dict[str, TaskTables] = {}
        self.by_partition: Dict[TopicPartitionKey, TaskTables] = {}
        self._cluster_id: Optional[str] = None
        self._partitions: Optional[int] = None
        self._restore_consumer: Optional[Consumer] = None
        self.restoring = False

    @property
    def enabled(self) -> bool:
        return bool(self.app.tables)

    # -- tasks come and go ----------------------------------------------------------
    def open(self, task: str, partition: int, start_offset: int,
             should_stop: Optional[Callable[[], bool]] = None) -> int:
        """Opens the task's store, brings it up to date from the changelog where needed
        and returns the offset to read the source partition from (DESIGN.md, "State
        (LMDB)"):

        * local state at the group's position (``start_offset``): nothing to do;
        * behind it, or missing: restore the changelog records written since the
          store's last changelog offsets (only what is missing), read from there;
        * ahead of it (a killed child's batches committed to LMDB but not yet to the
          group), or the group has no offset (a reset, retention): when nobody else has
          written the changelog since (see :meth:`_changelog_moved`), the state is
          exact: keep it and read from its own input offset, restoring nothing.  When
          the changelog moved and the group has an offset, rebuild from the changelog
          up to it; when it has none, apply what is newer in the changelog and read
          from the position the state then reflects.

        ``should_stop()`` is asked during a restore (the supervisor revoked the task or
        stops the child): the restore stops with :class:`RestoreInterrupted`, its
        progress per changelog partition kept for the next time."""
        if self._cluster_id is None:
            self._learn_cluster()
        tables = self.app.tables
        # no fsync per commit: LMDB stays consistent after a machine crash, only its last
        # commits may be gone, and state behind the group's offset is restored from the
        # changelog (Kafka keeps it durable), so exactness never rests on this disk
        store = TaskStore(task_dir(self.datadir, self.app.id, task), [t.name for t in tables],
                          sync=False)
        try:
            resume = self._bring_up_to_date(task, store, partition, start_offset, should_stop)
        except BaseException:
            store.close()
            raise
        store.set_meta(META_RELEASED, None)  # the task is this datadir's now
        assert self._partitions is not None
        tables_of_task = TaskTables(store, tables, partition, self.source,
                                    key_partitioner(self.app.topics[self.source].encode_key,
                                                    self._partitions), task,
                                    self.max_message_bytes)
        self.tasks[task] = tables_of_task
        self.by_partition[(self.source, partition)] = tables_of_task
        return resume

    def _bring_up_to_date(self, task: str, store: TaskStore, partition: int, start_offset: int,
                          should_stop: Optional[Callable[[], bool]]) -> int:
        """The decision of :meth:`open`; returns the offset to read from."""
        if store.ensure_identity(self._cluster_id or "", self.source):
            log.warning("task %s: local state came from another cluster or topic; discarded", task)
        tp = (self.source, partition)
        stored = store.input_offset(*tp)
        group = start_offset if start_offset >= 0 else "none"
        if stored is not None and (start_offset < 0 or stored > start_offset):
            # exactly-once: LMDB commits after the Kafka transaction, so state ahead of the
            # group's offset is not expected; if it is, its outputs are not committed and
            # the group's offset wins (the rebuild below)
            ahead_is_exact = not (self.app.exactly_once and start_offset >= 0)
            if ahead_is_exact and not self._changelog_moved(store, partition, stored):
                log.info("task %s: restored 0 changelog records: resumed from local state at "
                         "offset %d (group's position %s; nobody wrote the changelog since)",
                         task, stored, group)
                return stored
            if start_offset >= 0:
                # another owner wrote the changelog after this state (or, exactly-once, its
                # outputs are not committed): the only state known to be right is the
                # committed one, so rebuild it
                log.warning("task %s: local state at offset %d is ahead of the group's position "
                            "%d and cannot be kept (%s); rebuilding it from the changelog", task,
                            stored, start_offset, "another owner wrote the changelog since"
                            if ahead_is_exact else "exactly-once")
                store.wipe()
                store.set_identity(self._cluster_id or "", self.source)
                stored = None
        if start_offset < 0:
            # no committed offset (a new group, a reset, retention) and no local state to
            # keep: the changelog is the only record of what was processed.  Rebuild from
            # it up to the newest position its records say was durable everywhere (a
            # batch past it may have reached only some changelogs) and read on from there.
            if stored is not None or store.changelog_offsets():
                store.wipe()  # partial or overwritten: the changelog is the whole truth
                store.set_identity(self._cluster_id or "", self.source)
            confirmed = self._confirmed_position(partition)
            if confirmed <= 0:
                return start_offset  # nothing durable anywhere: the group's reset policy
            self.restore(task, store, partition, {tp: confirmed}, should_stop)
            log.info("task %s: the group has no offset for %s[%d]; tables restored from the "
                     "changelog, reading from offset %d", task, self.source, partition,
                     confirmed)
            return confirmed
        if stored is None or stored < start_offset:
            self.restore(task, store, partition, {tp: start_offset}, should_stop)
        else:
            log.info("task %s: local state is at the group's offset %d: no restore needed",
                     task, stored)
        return start_offset

    def _confirmed_position(self, partition: int) -> int:
        """The newest source offset that the task's changelog records say was durable
        everywhere (:data:`~shardworker.tables.HDR_SRC_CONFIRMED`), over every table's
        changelog partition; 0 when none says so."""
        consumer = self._restorer()
        confirmed = 0
        try:
            for table in self.app.tables:
                consumer.assign([TopicPartition(table.changelog_topic, partition,
                                                OFFSET_BEGINNING)])
                for _key, _value, headers in self._changelog(consumer, []):
                    found = confirmed_of(headers)
                    if found is not None and found[:2] == (self.source, partition):
                        confirmed = max(confirmed, found[2])
        finally:
            consumer.unassign()
        return confirmed

    def _changelog_moved(self, store: TaskStore, partition: int, stored: int) -> bool:
        """True when someone else wrote the task's changelogs after this state: a record
        past the store's changelog offsets whose source offset is below the state's
        input offset ``stored`` was written by an owner that processed records this state
        already holds (its value may be older than ours: the state cannot be kept).
        Records from at or after ``stored`` are this state's own batches that never
        reached LMDB (a kill between the broker's acknowledgement and the LMDB commit) or
        their like: the records from ``stored`` on are processed again and write the
        same keys after them.  The changelog's end is the fetch's high watermark."""
        consumer = self._restorer()
        try:
            for table in self.app.tables:
                last = store.changelog_offset(table.name)
                start = OFFSET_BEGINNING if last is None else last + 1
                consumer.assign([TopicPartition(table.changelog_topic, partition, start)])
                for _key, _value, headers in self._changelog(consumer, []):
                    source = source_of(headers)
                    if source is None or (source[0], source[1]) != (self.source, partition) \
                            or source[2] < stored:
                        return True
        finally:
            consumer.unassign()
        return False

    def close(self, task: str, released: bool = False) -> None:
        """Closes the task's store; ``released``: the task was revoked, so its copy here
        is marked stale for ``shardsup table`` (it may move to another machine)."""
        tables = self.tasks.pop(task, None)
        if tables is not None:
            self.by_partition = {k: v for k, v in self.by_partition.items() if v is not tables}
            if released:
                tables.abort()
                tables.store.set_meta(META_RELEASED, b"1")
            tables.close()

    def close_all(self) -> None:
        for task in list(self.tasks):
            self.close(task)
        if self._restore_consumer is not None:
            self._restore_consumer.close()
            self._restore_consumer = None

    def _learn_cluster(self) -> None:
        probe = Consumer(self.consumer_config)
        try:
            metadata = probe.list_topics(self.source, timeout=10)
        finally:
            probe.close()
        self._cluster_id = metadata.cluster_id or ""
        self._partitions = len(metadata.topics[self.source].partitions)

    # -- restore --------------------------------------------------------------------
    def restore(self, task: str, store: TaskStore, partition: int,
                committed: Dict[TopicPartitionKey, int],
                should_stop: Optional[Callable[[], bool]] = None) -> None:
        """Applies the changelog records written since the store's last changelog offsets
        whose source offset is below the group's committed offset (DESIGN.md: restore
        reflects exactly the committed position).  Each write transaction also stores the
        changelog offset reached, so an interrupted restore (``should_stop()`` turned
        True, a crash) goes on from there."""
        self.restoring = True
        began = time.monotonic()
        consumer = self._restorer()
        total_applied = total_skipped = 0
        try:
            for table in self.app.tables:
                last = store.changelog_offset(table.name)
                start = OFFSET_BEGINNING if last is None else last + 1
                consumer.assign([TopicPartition(table.changelog_topic, partition, start)])
                tail: List[int] = []
                applied, skipped = apply_changelog(
                    store, table.name, self._changelog(consumer, tail, should_stop), committed,
                    batch_size=RESTORE_COMMIT_EVERY, set_offsets=False,
                    position=lambda: tail[0] if tail else None)
                total_applied += applied
                total_skipped += skipped
            store.commit({}, committed, {})  # the state is complete: it is at that position
        except RestoreInterrupted:
            log.info("task %s: restore interrupted after %d changelog records (%.2fs); it goes "
                     "on from there next time", task, total_applied, time.monotonic() - began)
            raise
        finally:
            consumer.unassign()
            self.restoring = False
        elapsed = time.monotonic() - began
        log.info("task %s: restored %d changelog records (%d skipped: after the committed "
                 "offset) in %.2fs", task, total_applied, total_skipped, elapsed)

    def _restorer(self) -> Consumer:
        """The child's restore consumer, made once: a new consumer (or a topic it has not
        seen) costs about 0.5 s before its first fetch, per topic, which a child restoring
        eight small tasks of two tables used to pay sixteen times."""
        if self._restore_consumer is None:
            consumer = Consumer({**self.consumer_config, "enable.partition.eof": True,
                                 "client.id": f"{self.app.id}-restore",
                                 # back-to-back fetches: measured +15% records/s on tansu
                                 "fetch.wait.max.ms": 10})
            for table in self.app.tables:  # learn every changelog topic up front
                consumer.list_topics(table.changelog_topic, timeout=10)
            self._restore_consumer = consumer
        return self._restore_consumer

    def _changelog(self, consumer: Consumer, tail: List[int],
                   should_stop: Optional[Callable[[], bool]] = None
                   ) -> Iterator[Tuple[Optional[bytes], Optional[bytes], Any]]:
        """The records of the assigned changelog partition up to its end (the high
        watermark of the fetch responses: right on Kafka and on tansu alike).  Raises
        :class:`RestoreInterrupted` between fetches once ``should_stop()`` is True."""
        last_beat = time.monotonic()
        while True:
            if should_stop is not None and should_stop():
                raise RestoreInterrupted("the task was revoked or the child stops")
            # a short timeout: consume() waits it out even after the end-of-partition event
            for msg in consumer.consume(RESTORE_BATCH, 0.05):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        return
                    raise RuntimeError(f"restore: {err.str()}")
                tail[:] = [msg.offset()]
                yield msg.key(), msg.value(), msg.headers()
            if time.monotonic() - last_beat >= 1.0:
                self.heartbeat()  # a long restore is not a hang
                last_beat = time.monotonic()

    # -- per record and per batch ---------------------------------------------------
    def on_record(self, msg: Message) -> None:
        """Makes ``msg`` the record the tables see (its task, offset, timestamp)."""
        tables = self.by_partition.get((msg.topic(), msg.partition()))
        if tables is not None:
            CONTEXT.set_message(tables, msg)
        else:
            CONTEXT.clear()

    def drain(self, positions: Dict[TopicPartitionKey, int]) -> List[DrainedBatch]:
        """Ends the batch for every task it touched: produces one changelog record per
        changed key (offsets come back in delivery reports) and returns what to commit."""
        CONTEXT.clear()
        batches = []
        for tp, tables in self.by_partition.items():
            if tp not in positions:
                continue
            batch = tables.drain({tp: positions[tp]})
            delivered = _remember_offset(batch.changelog_offsets, self.delivery_errors)
            producer = self.producer_for(tables.task_id)
            for record in batch.records:
                produce(producer, record.topic, record.value, record.key, record.headers,
                        delivered(record.table), record.partition)
            batches.append(batch)
        return batches

    def commit(self, batches: List[DrainedBatch]) -> None:
        """After the acknowledgements: each task's state and offsets in one transaction."""
        for batch in batches:
            batch.commit()

    def rollback_record(self) -> None:
        """The record in hand failed: its table writes are taken back."""
        task = CONTEXT.task
        if task is not None:
            task.rollback_record()

    def abort(self, task: Optional[str] = None) -> None:
        """Batches failed before their commit: forget what they changed (in ``task``, or
        in every task)."""
        for name, tables in self.tasks.items():
            if task is None or name == task:
                tables.abort()


def _remember_offset(offsets: Dict[str, int], errors: List[str]
                     ) -> Callable[[str], Callable[[Any, Message], None]]:
    """Delivery callbacks for one batch's changelog records: they note the offset written
    per table, and failures (a per-message callback replaces the producer's own, so they
    must be passed on here or the batch would commit without its changelog)."""
    def for_table(table: str) -> Callable[[Any, Message], None]:
        def delivered(err: Any, msg: Message) -> None:
            if err is not None:
                errors.append(f"{msg.topic()}: {err.str()}")
            elif msg.offset() > offsets.get(table, -1):
                offsets[table] = msg.offset()

        return delivered

    return for_table
