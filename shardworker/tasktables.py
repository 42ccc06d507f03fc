"""The tables of one task, as the worker drives them: per record, the reads, the writes
into the per-batch write cache and the skip rule; the batches drained but not yet
committed, and their commit to LMDB.  Nothing here talks to Kafka: the worker feeds
records in (making each current in :data:`~shardworker.tablecontext.CONTEXT`) and
produces what :meth:`TaskTables.drain` returns.  The batch end itself (the drain, the
windows closed and expired) is :mod:`shardworker.batchend`, a part of
:class:`TaskTables`.

How the pieces fit (the worker's side, per task and batch)::

    task = TaskTables(TaskStore(path, [t.name for t in tables]), tables, partition=p,
                      source_topic="orders",
                      key_partition=key_partitioner(orders.encode_key, 8))
    for msg in batch:                                   # per record handed to an agent
        CONTEXT.set_record(task, msg.topic(), msg.partition(), msg.offset(), ts_ms)
        ... the agent reads and writes tables ...
    CONTEXT.clear()
    batch = task.drain()                                # (1) write cache → changelog records
    for rec in batch.records:                           # (2) produce, wait for the acks
        producer.produce(rec.topic, rec.value, rec.key, partition=rec.partition,
                         headers=rec.headers)
    producer.flush()
    batch.commit(changelog_offsets)                     # (3) LMDB: state + offsets, one txn
    ... (4) only now report batch.input_offsets as processed ...

Rules implemented here (DESIGN.md, "State (LMDB)"):

* **A record is never applied twice.**  When the current record's offset is below the
  input offset stored in LMDB for its partition, its effects are already in the state:
  its writes are silently ignored (reads still work and see the current state).
* **Write cache.**  A batch's writes stay in memory; a key changed 1000 times in a batch
  costs one LMDB put and one changelog record.  Values are serialized when they are
  written (so a value that cannot be serialized fails the record that wrote it, under
  the agent's error policy) and decoded again when read: mutating a value you read does
  nothing until you assign it back, exactly as with a value that came from disk.  The
  one exception is an int of 64 bits in a ``json`` table: it always encodes, so it is
  encoded when it leaves the cache (:data:`~shardworker.tablecontext.UNENCODED`).
* **Any upstream partitioner.**  A table write always goes to the task's changelog
  partition, so restore stays right whatever partitioner put the records on the source
  topic (the task cannot know which one the producer used).  A write under a key that is
  not the record's own and whose partition by Java Kafka's partitioner is another task's
  logs one warning per table (such a key is likely to be counted on two tasks: re-key
  the stream through a topic first); nothing is refused.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .batchend import TP, BatchEnd, DrainedBatch
from .origins import OriginMarks, marks_meta
from .partitioner import KeyPartitioner
from .produce import DEFAULT_MESSAGE_MAX_BYTES, RECORD_OVERHEAD, check_fits
from .store import TaskStore, stream_time_meta
from .tablecontext import (CONTEXT, INT_BOUND, INT_BYTES, MISSING, UNENCODED, TableContext,
                           TableError)
from .topology import source_key

if TYPE_CHECKING:
    from .tables import Table

__all__ = ["TaskTables"]

#: committed entries a task keeps per table for reads (a hot key is read from memory, not
#: from LMDB and its decoder, batch after batch); past this many the table starts over
CLEAN_CACHE_SIZE = 100_000

# the warnings about foreign keys keep the logger name they were always logged under
log = logging.getLogger("shardworker.tables")


# -- one task's tables -------------------------------------------------------------------
class TaskTables(BatchEnd):
    """The tables of ONE task: its :class:`TaskStore`, its write cache, the batches
    drained but not yet committed, and the rules (skip below the stored offset, key
    partition check, window expiry).

    ``key_partition`` (a :class:`~shardworker.partitioner.KeyPartitioner` of
    ``source_topic``) is used only to warn once per table about a write under a foreign
    key (see :meth:`check_key`); None: no warning.
    """

    def __init__(self, store: TaskStore, tables: Sequence["Table"], partition: int,
                 source_topic: str = "", key_partition: Optional[KeyPartitioner] = None,
                 task_id: str = "", max_message_bytes: int = DEFAULT_MESSAGE_MAX_BYTES) -> None:
        self.store = store
        self.tables: Dict[str, Table] = {t.name: t for t in tables}
        missing = [name for name in self.tables if name not in store.tables]
        if missing:
            raise TableError(f"the task store at {store.path} has no database for table(s) "
                             f"{', '.join(missing)}")
        self.partition = partition
        self.source_topic = source_topic
        self.key_partition = key_partition
        #: tables whose foreign-key warning was logged (once per table)
        self._warned: set = set()
        self.task_id = task_id
        self.max_key_size = int(store.env.max_key_size())
        #: the producer's ``message.max.bytes``: a changelog record must fit in it
        self.max_message_bytes = max_message_bytes
        #: key + value bytes that surely fit a changelog record (check_fits decides above)
        self._fits_under = max_message_bytes - RECORD_OVERHEAD
        #: table → key bytes → (value, serialized value or None = deleted, source tp)
        self.cache: Dict[str, Dict[bytes, Tuple[Any, Optional[bytes], TP]]] = {
            name: {} for name in self.tables}
        #: next input offsets whose effects are in LMDB (the skip rule's reference)
        self.stored: Dict[TP, int] = {source_key(*tp): offset  # found by identity: enter
                                      for tp, offset in store.input_offsets().items()}
        #: next input offsets of the records seen since the last drain
        self.pending: Dict[TP, int] = {}
        self.latest_ms: Optional[int] = store.stream_time()
        self._latest_tp: Optional[TP] = None
        #: the highest origin applied per upstream partition (records the app sent itself)
        self.origins = OriginMarks(store.origin_marks())
        #: stream time before the current record moved it (taken back if it fails)
        self._ms_before: Optional[int] = self.latest_ms
        self._tp_before: Optional[TP] = None
        self._expired_upto: Dict[str, int] = {}
        #: stream time at the last drain: the windows closed up to it have had their
        #: final records (a function of stream time alone, so a restored task agrees)
        self._closed_time: Optional[int] = self.latest_ms
        #: records found late per table since the task opened (a write to a closed window)
        self.late: Dict[str, int] = {}
        self._last_late: Optional[Tuple[str, Optional[str], int, int]] = None
        self.inflight: List[DrainedBatch] = []
        #: table → key bytes → (Python value or MISSING, serialized value or None): what
        #: LMDB holds, for keys read or committed lately (only :meth:`_commit` writes LMDB
        #: while the task is open, and it updates this too)
        self._clean: Dict[str, Dict[bytes, Tuple[Any, Optional[bytes]]]] = {
            name: {} for name in self.tables}
        #: cache entries as they were before the current record wrote them (None: absent)
        self.undo: Dict[Tuple[str, bytes], Optional[Tuple[Any, Optional[bytes], TP]]] = {}

    def __repr__(self) -> str:
        return f"<TaskTables {self.task_id or self.partition} {list(self.tables)}>"

    # -- per record -----------------------------------------------------------------------
    def enter(self, msg: Any, source: TP, event_ms: Optional[int] = None,
              ctx: TableContext = CONTEXT) -> None:
        """Makes ``msg`` (a ``confluent_kafka.Message``, or what has its methods) of
        ``source`` (its topic, partition) the record ``ctx`` stands for, a record of this
        task's current batch: its timestamp (``event_ms`` when its topic extracts event
        time) advances the task's stream time, which :meth:`rollback_record` takes back
        if it fails; its writes count unless its effects are stored already (the skip
        rule).  Its offset reaches the batch through the worker's positions at the drain
        (:meth:`drain`'s ``input_offsets``).  One call a record: it runs for every
        record, so :class:`TableContext` holds nothing but the fields set here."""
        if event_ms is not None:
            stamp = event_ms
        else:
            kind, stamp = msg.timestamp()
            if not kind or stamp is None or stamp < 0:
                stamp = int(time.time() * 1000)
        offset = msg.offset()
        ctx.task = self
        ctx.source = source
        ctx.record = msg
        ctx.offset = offset
        ctx.timestamp_ms = stamp
        latest = self.latest_ms
        self._ms_before, self._tp_before = latest, self._latest_tp
        if latest is None or stamp > latest:
            self.latest_ms = stamp
            self._latest_tp = source
        elif self._latest_tp is None:
            self._latest_tp = source
        stored = self.stored.get(source)
        ctx.writable = stored is None or offset >= stored
        self.undo.clear()

    def note_offset(self, source: TP, offset: int) -> None:
        """Puts a record's next offset into the batch without the worker's positions
        (records made current by hand: ``TableContext.set_record``)."""
        pending = self.pending
        if pending.get(source, -1) <= offset:
            pending[source] = offset + 1

    # -- reads and writes (called by Table) -----------------------------------------------
    def read_raw(self, table: str, kb: bytes) -> Tuple[Any, Optional[bytes]]:
        """``(value or MISSING, serialized)`` of a key: write cache, then batches in
        flight (newest first), then LMDB.  ``value`` is the Python object when the cache
        has one that decodes to itself, else MISSING and the caller decodes."""
        entry = self.cache[table].get(kb)
        if entry is not None:
            return entry[0], self.raw_of(table, entry)
        return self.read_behind_cache(table, kb)

    def read_behind_cache(self, table: str, kb: bytes) -> Tuple[Any, Optional[bytes]]:
        """:meth:`read_raw` for a key not in the write cache: batches in flight (newest
        first), then LMDB (``Table.__getitem__`` looks in the write cache itself)."""
        for batch in reversed(self.inflight):
            writes = batch.writes.get(table)
            if writes is not None and kb in writes:
                return batch.values[table].get(kb, MISSING), writes[kb]
        clean = self._clean[table]
        hit = clean.get(kb)
        if hit is not None:
            return hit
        raw = self.store.get(table, kb)
        if len(clean) >= CLEAN_CACHE_SIZE:
            clean.clear()
        clean[kb] = (MISSING, raw)
        return MISSING, raw

    def write(self, table: "Table", kb: bytes, key: Any, value: Any, ctx: TableContext,
              encoded: Optional[bytes] = None) -> None:
        """Stages ``value`` (None deletes) for ``kb`` in the write cache, unless the current
        record's effects are already stored.  ``key`` is the user's key (partition check).
        ``encoded``: the stored bytes as they are (a table's own bookkeeping entries, not
        serialized with its value serializer)."""
        cache = self.cache[table.name]
        if kb not in cache:  # first write of this key in the batch: check it once
            self.check_key(table, key, kb, ctx.key)
        if not ctx.writable:
            return
        if encoded is not None:
            raw: Optional[bytes] = encoded
        elif (type(value) is int and table._defers_ints and -INT_BOUND <= value < INT_BOUND
              and len(kb) + INT_BYTES <= self._fits_under):
            raw = UNENCODED
        else:
            raw = None if value is None else table._encode_value(value)
        if raw is None:
            value = None
        elif len(kb) + len(raw) > self._fits_under:
            # too large for its changelog: the record that wrote it fails, not the batch
            check_fits(table.changelog_topic, kb, raw, self.max_message_bytes)
        # the entry before the record's first write of the key (saved once per record)
        self.undo.setdefault((table.name, kb), cache.get(kb))
        cache[kb] = (value, raw, ctx.source)  # type: ignore[assignment]

    def rollback_record(self) -> None:
        """Takes back every write of the current record and the stream time it moved (it
        failed and is dead-lettered or skipped: a failed record leaves the tables and the
        window expiry as they were; DESIGN.md, "State (LMDB)")."""
        self.latest_ms, self._latest_tp = self._ms_before, self._tp_before
        for (table, kb), before in self.undo.items():
            if before is None:
                self.cache[table].pop(kb, None)
            else:
                self.cache[table][kb] = before
        self.undo.clear()

    def note_late(self, table: "Table", ctx: TableContext) -> None:
        """The current record wrote to a closed window of ``table``: counted once per
        record and table; raises :class:`~shardworker.windowclose.LateRecordError` when
        the table dead-letters late records (DESIGN.md, "Windows and time")."""
        mark = (table.name, ctx.topic, ctx.partition, ctx.offset)
        if mark != self._last_late:
            self._last_late = mark
            self.late[table.name] = self.late.get(table.name, 0) + 1
            table.late_count += 1
        if table.on_late == "dlq":
            from .windowclose import LateRecordError

            raise LateRecordError(f"table {table.name}: the record's window is closed "
                                  f"(stream time {self.latest_ms} ms)")

    def check_key(self, table: "Table", key: Any, kb: bytes,
                  record_key: Optional[bytes] = None) -> None:
        """Raises unless ``key`` fits LMDB; warns once per table about a key that is
        likely another task's.  Nothing is refused for its partition: the upstream
        producer's partitioner is unknown (librdkafka's default is consistent_random,
        not murmur2), and the write goes to this task's changelog partition, so restore
        is right either way (DESIGN.md, "State (LMDB)")."""
        if not kb or len(kb) > self.max_key_size:
            raise TableError(f"table {table.name}: key {key!r} is {len(kb)} bytes serialized; "
                             f"LMDB keys are 1 to {self.max_key_size} bytes")
        if self.key_partition is None or table.name in self._warned:
            return
        try:
            if record_key is None or self.key_partition.of_bytes(record_key) != self.partition:
                return  # the upstream is not murmur2-partitioned: nothing to compare with
            part = self.key_partition(key)
        except Exception:  # noqa: BLE001 - a key the source serializer cannot write
            return
        if part != self.partition:
            self._warned.add(table.name)
            log.warning("table %s: task %s writes key %r, which Java Kafka's partitioner puts "
                        "on partition %d of %s, not %d: if other records carry that key, it is "
                        "counted on more than one task (re-key the stream through a topic "
                        "keyed by it first); warned once per table", table.name,
                        self.task_id or self.partition, key, part,
                        self.source_topic or "the source topic", self.partition)

    def iter_raw(self, table: str) -> Iterator[Tuple[bytes, bytes]]:
        """Every (key, serialized value) of ``table`` as this task sees it now: LMDB
        overlaid with the batches in flight and the write cache."""
        overlay = self._uncommitted(table)
        for kb, raw in self.store.items(table):
            if kb not in overlay:
                yield kb, raw
        for kb, raw in sorted(overlay.items()):
            if raw is not None:
                yield kb, raw

    # -- after the batch end (the drain: shardworker.batchend) ----------------------------
    def _commit(self, batch: DrainedBatch, changelog_offsets: Dict[str, int]) -> None:
        if batch.committed:
            raise TableError("this batch is committed already")
        if not self.inflight or self.inflight[0] is not batch:
            raise TableError("batches of a task must be committed in the order they were "
                             "drained")
        stored = self.stored
        offsets = {tp: nxt for tp, nxt in batch.input_offsets.items() if nxt > stored.get(tp, -1)}
        meta = None
        if batch.latest_ms is not None:
            meta = stream_time_meta(batch.latest_ms)
        if batch.origins:
            meta = {**(meta or {}), **marks_meta(batch.origins)}
        self.store.commit(batch.writes, offsets, changelog_offsets, meta)
        stored.update(offsets)
        self.origins.commit(batch.origins)
        for name, table_writes in batch.writes.items():
            clean = self._clean[name]
            if len(clean) + len(table_writes) > CLEAN_CACHE_SIZE:
                clean.clear()
            table_values = batch.values.get(name, {})
            for kb, raw in table_writes.items():
                clean[kb] = (table_values.get(kb, MISSING), raw)
        batch.committed = True
        self.inflight.pop(0)

    def abort(self) -> None:
        """Forgets everything not committed (write cache, pending offsets, batches in
        flight): after a failed batch, re-read from the stored offsets."""
        for name in self.cache:
            self.cache[name] = {}
        self.pending = {}
        self.inflight = []
        self._expired_upto = {}
        self.latest_ms = self.store.stream_time()
        self._closed_time = self.latest_ms
        self.origins.abort()

    def close(self) -> None:
        """Closes the store; uncommitted work is dropped."""
        self.abort()
        self.store.close()
