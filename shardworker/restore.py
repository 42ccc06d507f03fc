"""Restoring a task's tables from their changelogs (DESIGN.md, "State (LMDB)",
"Restore", "Resume after a kill", "Offsets gone").

:class:`Restorer` decides, when a task is assigned, whether its local state can be kept,
must be completed from the changelog or rebuilt, and where reading the source resumes;
:func:`apply_changelog` writes changelog records into the task's store under the rule
"a record is applied only when its whole batch is committed".  A restore holds no
transaction; it stores its progress as it goes, so an interrupted restore (revocation,
crash) continues where it stopped.
"""
from __future__ import annotations

import logging
import time
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Sequence, Set, Tuple)

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError

from .beginning import assignable
from .changelog import (HDR_SRC_OFFSET, HDR_SRC_PARTITION, HDR_SRC_TOPIC, HDR_STREAM_TIME,
                        confirmed_of, source_of)
from .origins import HDR_ORIGINS, decode_marks, marks_meta
from .origins import merge as merge_marks
from .store import TaskStore, stream_time_meta
from .topology import TopicPartitionKey

if TYPE_CHECKING:
    from .app import App
    from .tables import Table

__all__ = ["Restorer", "RestoreInterrupted", "apply_changelog", "RESTORE_BATCH",
           "RESTORE_COMMIT_EVERY"]

# the restore's messages keep the logger name they were always logged under
log = logging.getLogger("shardworker.state")

RESTORE_BATCH = 10_000  # records fetched per consume() call while restoring
#: changelog records per restore write transaction; each stores the changelog position
#: reached, so an interrupted restore goes on from there (see apply_changelog)
RESTORE_COMMIT_EVERY = 50_000

TP = Tuple[str, int]
#: a changelog record as :func:`apply_changelog` takes it: (key, value, headers)
ChangelogInput = Tuple[Optional[bytes], Optional[bytes], Any]
_MISSING = object()


class RestoreInterrupted(Exception):
    """A restore stopped because the task is revoked or the child stops; what it applied
    is kept, with its changelog offsets, and the next restore goes on from there."""


class Restorer:
    """Brings the stores of one child's tasks up to date from their changelogs, with one
    restore consumer for the whole child (made when first needed).

    A task reads partition *p* of each source topic of its sub-topology and holds that
    sub-topology's tables; ``heartbeat()`` is called about once a second during a long
    restore (a long restore is not a hang)."""

    def __init__(self, app: "App", consumer_config: Dict[str, Any],
                 heartbeat: Callable[[], None]) -> None:
        self.app = app
        self.consumer_config = consumer_config
        self.heartbeat = heartbeat
        self._restore_consumer: Optional[Consumer] = None
        #: True while a restore runs (the worker reports it and skips lag then)
        self.restoring = False
        #: task → changelog records read while restoring it, in this process (a metric)
        self.restored: Dict[str, int] = {}

    def close(self) -> None:
        if self._restore_consumer is not None:
            self._restore_consumer.close()
            self._restore_consumer = None

    def bring_up_to_date(self, task: str, store: TaskStore, tables: Sequence["Table"],
                         starts: Dict[TP, int], cluster_id: str,
                         should_stop: Optional[Callable[[], bool]]) -> Dict[TP, int]:
        """The decision of :meth:`TaskStates.open <shardworker.state.TaskStates.open>`
        (see there) for the task's opened ``store`` holding ``tables``; ``starts``: the
        group's position per source partition of the task (-1: none); ``cluster_id``: the
        Kafka cluster's, kept with the state.  Returns where to read each source
        partition from."""
        identity = ",".join(sorted({t for t, _p in starts}))
        if store.ensure_identity(cluster_id, identity):
            log.warning("task %s: local state came from another cluster or topic; discarded", task)
        stored = {tp: store.input_offset(*tp) for tp in starts}
        group = ", ".join(f"{t}[{p}]@{o if o >= 0 else 'none'}" for (t, p), o in starts.items())
        ahead = [tp for tp, at in stored.items()
                 if at is not None and (starts[tp] < 0 or at > starts[tp])]
        if ahead:
            # exactly-once: LMDB commits after the Kafka transaction, so state ahead of the
            # group's offset is not expected; if it is, its outputs are not committed and
            # the group's offset wins (the rebuild below)
            ahead_is_exact = not (self.app.exactly_once and any(starts[tp] >= 0 for tp in ahead))
            if ahead_is_exact and not self._changelog_moved(store, tables, stored):
                log.info("task %s: restored 0 changelog records: resumed from local state at "
                         "%s (group's position %s; nobody wrote the changelog since)", task,
                         ", ".join(f"{t}[{p}]@{o}" for (t, p), o in stored.items() if o is not None),
                         group)
                return {tp: stored[tp] if stored[tp] is not None else start
                        for tp, start in starts.items()}
            if any(start >= 0 for start in starts.values()):
                # another owner wrote the changelog after this state (or, exactly-once, its
                # outputs are not committed): the only state known to be right is the
                # committed one, so rebuild it
                log.warning("task %s: local state is ahead of the group's position %s and "
                            "cannot be kept (%s); rebuilding it from the changelog", task,
                            group, "another owner wrote the changelog since"
                            if ahead_is_exact else "exactly-once")
                store.wipe()
                store.set_identity(cluster_id, identity)
                stored = {tp: None for tp in starts}
        if all(start < 0 for start in starts.values()):
            # no committed offset (a new group, a reset, retention) and no local state to
            # keep: the changelog is the only record of what was processed.  Rebuild from
            # it up to the newest position its records say was durable everywhere (a
            # batch past it may have reached only some changelogs) and read on from there.
            if any(at is not None for at in stored.values()) or store.changelog_offsets():
                store.wipe()  # partial or overwritten: the changelog is the whole truth
                store.set_identity(cluster_id, identity)
            confirmed = self._confirmed_positions(tables, starts)
            if not confirmed:
                return dict(starts)  # nothing durable anywhere: the group's reset policy
            self.restore(task, store, tables, confirmed, should_stop)
            log.info("task %s: the group has no offsets; tables restored from the changelog, "
                     "reading from %s", task,
                     ", ".join(f"{t}[{p}]@{o}" for (t, p), o in confirmed.items()))
            return {tp: confirmed.get(tp, start) for tp, start in starts.items()}
        # a partition of the task without a group offset (a topic nobody read yet) starts
        # where the reset policy says; its changelog records, if any, are not applied
        committed = {tp: start for tp, start in starts.items() if start >= 0}
        if any(stored[tp] is None or stored[tp] < start  # type: ignore[operator]
               for tp, start in committed.items()):
            self.restore(task, store, tables, committed, should_stop)
        else:
            log.info("task %s: local state is at the group's position %s: no restore needed",
                     task, group)
        return dict(starts)

    def _confirmed_positions(self, tables: Sequence["Table"], starts: Dict[TP, int]
                             ) -> Dict[TP, int]:
        """Per source partition of the task, the newest offset that its changelog records
        say was durable everywhere (:data:`~shardworker.changelog.HDR_SRC_CONFIRMED`),
        over every table's changelog partition (read together: their order does not
        matter); partitions none speaks of are left out."""
        consumer = self._consumer()
        confirmed: Dict[TP, int] = {}
        partition = next(iter(starts))[1]
        try:
            consumer.assign([assignable(table.changelog_topic, partition, OFFSET_BEGINNING)
                             for table in tables])
            ends = len({table.changelog_topic for table in tables})  # distinct partitions
            for _key, _value, headers in self._changelog(consumer, [], partitions=ends):
                found = confirmed_of(headers)
                if found is not None and found[:2] in starts and found[2] > 0:
                    tp = (found[0], found[1])
                    confirmed[tp] = max(confirmed.get(tp, 0), found[2])
        finally:
            consumer.unassign()
        return confirmed

    def _changelog_moved(self, store: TaskStore, tables: Sequence["Table"],
                         stored: Dict[TP, Optional[int]]) -> bool:
        """True when someone else wrote the task's changelogs after this state: a record
        past the store's changelog offsets whose source offset is below the state's
        input offset (``stored``) was written by an owner that processed records this
        state already holds (its value may be older than ours: the state cannot be kept);
        so was one from a source partition the state has no offset for.  Records from at
        or after ``stored`` are this state's own batches that never reached LMDB (a kill
        between the broker's acknowledgement and the LMDB commit) or their like: the
        records from ``stored`` on are processed again and write the same keys after
        them.  The changelog's end is the fetch's high watermark.  The tables' changelogs
        are read together: one such record in any of them is enough."""
        consumer = self._consumer()
        partition = next(iter(stored))[1]
        try:
            consumer.assign([assignable(table.changelog_topic, partition,
                                        self._after_stored(store, table))
                             for table in tables])
            ends = len({table.changelog_topic for table in tables})  # distinct partitions
            for _key, _value, headers in self._changelog(consumer, [], partitions=ends):
                source = source_of(headers)
                at = None if source is None else stored.get((source[0], source[1]))
                if at is None or source[2] < at:  # type: ignore[index]
                    return True
        finally:
            consumer.unassign()
        return False

    def restore(self, task: str, store: TaskStore, tables: Sequence["Table"],
                committed: Dict[TopicPartitionKey, int],
                should_stop: Optional[Callable[[], bool]] = None) -> None:
        """Applies the changelog records written since the store's last changelog offsets
        whose source offset is below the group's committed offset (DESIGN.md: restore
        reflects exactly the committed position).  Each write transaction also stores the
        changelog offset reached, so an interrupted restore (``should_stop()`` turned
        True, a crash) goes on from there."""
        self.restoring = True
        self.restored.setdefault(task, 0)
        began = time.monotonic()
        consumer = self._consumer()
        total_applied = total_skipped = 0
        partition = next(iter(committed))[1]
        try:
            for table in tables:
                consumer.assign([assignable(table.changelog_topic, partition,
                                            self._after_stored(store, table))])
                tail: List[int] = []
                applied, skipped = apply_changelog(
                    store, table.name, self._changelog(consumer, tail, should_stop, task), committed,
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

    @staticmethod
    def _after_stored(store: TaskStore, table: "Table") -> int:
        """Where the table's changelog is read from: after what the store holds of it."""
        last = store.changelog_offset(table.name)
        return OFFSET_BEGINNING if last is None else last + 1

    def metadata(self, topic: str) -> Any:
        """The cluster's metadata for ``topic`` (cluster id, partitions), asked through
        the restore consumer: a client made only for it would cost a connection."""
        return self._consumer().list_topics(topic, timeout=10)

    def restore_consumer_config(self) -> Dict[str, Any]:
        """The child's consumer settings, made to read changelogs from their start to
        their end, fast."""
        return {**self.consumer_config, "enable.partition.eof": True,
                "client.id": f"{self.app.id}-restore",
                # a changelog is read from its start (assignable: offset 0, which
                # retention may have removed), whatever the app's auto_offset_reset
                "auto.offset.reset": "earliest",
                # how long the broker holds a fetch with nothing to read: twice per
                # changelog partition, at its end (10 ms made reading an empty one 22 ms,
                # 0.35 s for eight tasks of two tables; 1 ms makes it 4); while records
                # remain it answers at once (back-to-back fetches: +15% records/s on tansu
                # over the default 500 ms)
                "fetch.wait.max.ms": 1}

    def _consumer(self) -> Consumer:
        """The child's restore consumer, made once: a new consumer (or a topic it has not
        seen) costs about 0.5 s before its first fetch, per topic, which a child restoring
        eight small tasks of two tables used to pay sixteen times."""
        if self._restore_consumer is None:
            consumer = Consumer(self.restore_consumer_config())
            for table in self.app.tables:  # learn every changelog topic up front
                consumer.list_topics(table.changelog_topic, timeout=10)
            self._restore_consumer = consumer
        return self._restore_consumer

    def _changelog(self, consumer: Consumer, tail: List[int],
                   should_stop: Optional[Callable[[], bool]] = None, restoring: str = "",
                   partitions: int = 1) -> Iterator[Tuple[Optional[bytes], Optional[bytes], Any]]:
        """The records of the assigned changelog partitions (``partitions`` of them) up to
        the end of each (the high watermark of the fetch responses: right on Kafka and on
        tansu alike).  Raises :class:`RestoreInterrupted` between fetches once
        ``should_stop()`` is True.  ``restoring``: the task restored, whose records read
        are counted (a metric)."""
        last_beat = time.monotonic()
        ended: Set[TP] = set()  # partitions whose end was reached
        while True:
            if should_stop is not None and should_stop():
                raise RestoreInterrupted("the task was revoked or the child stops")
            batch = fetched(consumer)
            if restoring:  # progress, per fetch (not per record); the end event is no record
                self.restored[restoring] += len(batch) - (1 if batch and batch[-1].error() else 0)
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"restore: {err.str()}")
                    ended.add((msg.topic(), msg.partition()))
                    if len(ended) == partitions:
                        return
                    continue
                tail[:] = [msg.offset()]
                yield msg.key(), msg.value(), msg.headers()
            if time.monotonic() - last_beat >= 1.0:
                self.heartbeat()  # a long restore is not a hang
                last_beat = time.monotonic()


def fetched(consumer: Consumer, wait: float = 0.05) -> List[Any]:
    """What the restore consumer holds now, up to :data:`RESTORE_BATCH` records; when it
    holds nothing, the next record or event, waiting at most ``wait`` seconds.
    ``consume()`` with a timeout waits all of it out unless the batch fills, even after
    the end-of-partition event came: every changelog partition read took the whole
    50 ms; ``poll()`` returns at the first record or event."""
    batch = consumer.consume(RESTORE_BATCH, 0)
    if batch:
        return batch
    msg = consumer.poll(wait)
    return [] if msg is None else [msg]


def apply_changelog(store: TaskStore, table: str, records: Iterable[ChangelogInput],
                    committed: Mapping[TP, int], batch_size: int = 50_000,
                    last_offset: Optional[int] = None, set_offsets: bool = True,
                    position: Optional[Callable[[], Optional[int]]] = None) -> Tuple[int, int]:
    """Restores ``table`` from its changelog: ``records`` are ``(key, value or None,
    headers)`` in changelog order (headers as confluent_kafka gives them: a list of
    ``(name, bytes)``, or a dict).  Returns ``(applied, skipped)``.

    A record is applied only if its :data:`HDR_SRC_OFFSET` is BELOW ``committed[(source
    topic, source partition)]`` (the group's committed offset): later ones belong to
    batches that will be processed again.  A record without the source headers, or from
    a partition without a committed offset, is skipped.  (With the group's offsets gone,
    ``committed`` is the newest :data:`HDR_SRC_CONFIRMED` position instead: DESIGN.md,
    "State (LMDB)".)  Values are whole
    values, so applying a changelog twice gives the same state.  Writes go in
    transactions of ``batch_size`` records (50,000: measured here, 10,000 per
    transaction restores about 155,000 records/s, 50,000 about 280,000, 100,000+ slower
    again).  A crash in the middle leaves complete transactions only, and restoring
    again is harmless; with ``position`` (the changelog offset of the last record
    handed in) every transaction also stores how far the table got, so an interrupted
    restore goes on from there instead of from the beginning.

    The stream time (:data:`HDR_STREAM_TIME`) of the newest applied record becomes the
    store's :data:`META_LATEST_TIMESTAMP` when it is later than the stored one.

    At the end (with ``set_offsets``) the input offsets become ``committed`` and, when
    ``last_offset`` is given, the table's changelog offset becomes it, in the last write
    transaction.  When restoring several tables of one task, pass ``set_offsets=False``
    for all but the last, so the offsets never claim a state that is not complete.  The
    store must be empty or behind ``committed`` (a store ahead of it is wiped first).
    """
    limits: Dict[Tuple[Any, Any], Optional[int]] = {}
    chunk: Dict[bytes, Optional[bytes]] = {}
    applied = skipped = 0
    in_chunk = 0
    commit = store.commit
    o_name, p_name, t_name, s_name = HDR_SRC_OFFSET, HDR_SRC_PARTITION, HDR_SRC_TOPIC, HDR_STREAM_TIME
    g_name = HDR_ORIGINS
    #: the origin marks: the store's, raised by those of the applied records (never
    #: lowered: another table's records, or local state, may hold higher ones)
    origins: Dict[str, Tuple[int, int]] = store.origin_marks()
    marks_before = dict(origins)
    last_g: Any = None
    # the records of one batch share their headers' values: decide once per run of them
    last_t: Any = None
    last_p: Any = None
    last_o: Any = None
    last_s: Any = None
    last_ok = False
    newest_time: Optional[int] = None

    def progress() -> Dict[str, int]:
        at = position() if position is not None else None
        return {} if at is None else {table: at}

    def stream_time() -> Optional[Dict[str, Optional[bytes]]]:
        """The newest stream time applied, when later than the stored one, and the origin
        marks applied: they commit with every chunk, so an interrupted restore keeps them
        with what it applied."""
        meta: Dict[str, Optional[bytes]] = (marks_meta(origins) if origins != marks_before
                                             else {})
        stored = store.stream_time()
        if newest_time is not None and (stored is None or stored < newest_time):
            meta.update(stream_time_meta(newest_time))
        return meta or None

    for key, value, headers in records:
        src_t = src_p = src_o = src_s = src_g = None
        if headers:
            if type(headers) is dict:  # noqa: E721 - a list is by far the usual case
                headers = headers.items()
            for name, hval in headers:
                if name == o_name:
                    src_o = hval
                elif name == p_name:
                    src_p = hval
                elif name == t_name:
                    src_t = hval
                elif name == s_name:
                    src_s = hval
                elif name == g_name:
                    src_g = hval
        if src_o == last_o and src_p == last_p and src_t == last_t:
            ok = last_ok
        elif src_o is None or src_p is None or src_t is None:
            ok = False
        else:
            lk = (src_t, src_p)
            limit = limits.get(lk, _MISSING)
            if limit is _MISSING:
                topic = src_t.decode() if isinstance(src_t, (bytes, bytearray)) else str(src_t)
                limit = limits[lk] = committed.get((topic, int(src_p)))
            ok = limit is not None and int(src_o) < limit  # type: ignore[operator]
            last_t, last_p, last_o, last_ok = src_t, src_p, src_o, ok
        if not ok or key is None:
            skipped += 1
            continue
        if src_g is not None and src_g != last_g:
            last_g = src_g
            merge_marks(origins, decode_marks(src_g))
        if src_s is not None and src_s != last_s:
            last_s = src_s
            stamp = int(src_s)
            if newest_time is None or stamp > newest_time:
                newest_time = stamp
        chunk[key] = value
        applied += 1
        in_chunk += 1
        if in_chunk >= batch_size:
            commit({table: chunk}, {}, progress(), stream_time())
            chunk = {}
            in_chunk = 0
    changelog = progress()
    if set_offsets and last_offset is not None:
        changelog = {table: last_offset}
    offsets = dict(committed) if set_offsets else {}
    commit({table: chunk}, offsets, changelog, stream_time())
    return applied, skipped
