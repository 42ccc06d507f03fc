"""The tables of one task, as the worker drives them: the per-batch write cache, the
batches drained but not yet committed, and their commit to LMDB.  Nothing here talks to
Kafka: the worker feeds records in (making each current in
:data:`~shardworker.tablecontext.CONTEXT`) and produces what :meth:`TaskTables.drain`
returns.

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
  nothing until you assign it back, exactly as with a value that came from disk.
* **Whole values.**  Changelog records carry the whole value (never a delta), with the
  source partition and batch offset in headers (:mod:`shardworker.changelog`): the
  offset is the LAST input offset of that partition in the batch, so restore applies a
  record only when its whole batch is committed.
* **Any upstream partitioner.**  A table write always goes to the task's changelog
  partition, so restore stays right whatever partitioner put the records on the source
  topic (the task cannot know which one the producer used).  A write under a key that is
  not the record's own and whose partition by Java Kafka's partitioner is another task's
  logs one warning per table (such a key is likely to be counted on two tasks: re-key
  the stream through a topic first); nothing is refused.
* **Window expiry.**  At the end of a batch, windows that expired (relative to the
  task's stream time) become deletions: tombstones in the changelog, deletes in LMDB.
"""
from __future__ import annotations

import logging
from typing import (TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence,
                    Tuple)

from .changelog import ChangelogRecord, batch_headers
from .origins import HDR_ORIGINS, OriginMarks, encode_marks, marks_meta
from .partitioner import KeyPartitioner
from .produce import DEFAULT_MESSAGE_MAX_BYTES, check_fits
from .store import TaskStore, stream_time_meta
# CONTEXT: imported from here by scripts/bench
from .tablecontext import CONTEXT, MISSING, TableContext, TableError

if TYPE_CHECKING:
    from .tables import Table
    from .windowclose import FinalRecord

__all__ = ["TaskTables", "DrainedBatch", "CONTEXT"]

TP = Tuple[str, int]
#: committed entries a task keeps per table for reads (a hot key is read from memory, not
#: from LMDB and its decoder, batch after batch); past this many the table starts over
CLEAN_CACHE_SIZE = 100_000

# the warnings about foreign keys keep the logger name they were always logged under
log = logging.getLogger("shardworker.tables")


# -- one task's tables -------------------------------------------------------------------
class DrainedBatch:
    """What one batch changed in one task: the changelog records to produce, the LMDB
    writes, and the input offsets they reflect.  Produce :attr:`records`, wait for the
    broker's acknowledgements, then :meth:`commit`.  Every drained batch of a task, empty
    ones included, is committed in drain order (or :meth:`TaskTables.abort` drops them):
    a later batch's offsets must never reach LMDB before an earlier batch's state."""

    def __init__(self, task: "TaskTables", records: List[ChangelogRecord],
                 writes: Dict[str, Dict[bytes, Optional[bytes]]],
                 input_offsets: Dict[TP, int], latest_ms: Optional[int],
                 values: Optional[Dict[str, Dict[bytes, Any]]] = None,
                 origins: Optional[Dict[str, Tuple[int, int]]] = None,
                 finals: Optional[List["FinalRecord"]] = None) -> None:
        self.task = task
        #: the final records of the windows the batch closed (``on_close``), produced
        #: with :attr:`records` on the task's producer (DESIGN.md, "Windows and time")
        self.finals: List["FinalRecord"] = finals or []
        #: the origin marks the batch advanced (:mod:`shardworker.origins`)
        self.origins = origins or {}
        self.records = records
        #: ``{table: {key: value or None}}`` for :meth:`TaskStore.commit`
        self.writes = writes
        #: ``{table: {key: the Python value written}}``: reads of the batch need no decode
        self.values = values if values is not None else {}
        #: ``{(topic, partition): next offset to read}`` for :meth:`TaskStore.commit`
        self.input_offsets = input_offsets
        self.latest_ms = latest_ms
        #: offset of the last changelog record written per table, filled in by the
        #: producer's delivery reports before the batch commits
        self.changelog_offsets: Dict[str, int] = {}
        self.committed = False

    @property
    def empty(self) -> bool:
        """True when the batch changed no table (its offsets may still be worth storing)."""
        return not self.records and not self.finals

    def commit(self, changelog_offsets: Optional[Mapping[str, int]] = None) -> None:
        """Commits the batch to LMDB (state + input offsets + the changelog offsets:
        ``changelog_offsets`` if given, else :attr:`changelog_offsets`) in one
        transaction.  Call it only after every record of :attr:`records` is acknowledged,
        and commit batches of a task in the order they were drained."""
        offsets = self.changelog_offsets if changelog_offsets is None else changelog_offsets
        self.task._commit(self, dict(offsets))


class TaskTables:
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
        #: table → key bytes → (value, serialized value or None = deleted, source tp)
        self._cache: Dict[str, Dict[bytes, Tuple[Any, Optional[bytes], TP]]] = {
            name: {} for name in self.tables}
        #: next input offsets whose effects are in LMDB (the skip rule's reference)
        self.stored: Dict[TP, int] = store.input_offsets()
        #: next input offsets of the records seen since the last drain
        self.pending: Dict[TP, int] = {}
        self.latest_ms: Optional[int] = store.stream_time()
        self._latest_tp: Optional[TP] = None
        #: the highest origin applied per upstream partition (records the app sent itself)
        self.origins = OriginMarks(store.origin_marks())
        #: stream time before the current record moved it (taken back if it fails)
        self._time_before: Tuple[Optional[int], Optional[TP]] = (self.latest_ms, None)
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
    def observe(self, topic: str, partition: int, offset: int, timestamp_ms: int) -> bool:
        """Notes a record of the current batch (its offset goes into the next commit,
        its timestamp advances the task's stream time, which :meth:`rollback_record`
        takes back if it fails); True when its writes count."""
        tp = (topic, partition)
        if self.pending.get(tp, -1) <= offset:
            self.pending[tp] = offset + 1
        latest = self.latest_ms
        self._time_before = (latest, self._latest_tp)
        if latest is None or timestamp_ms > latest:
            self.latest_ms = timestamp_ms
            self._latest_tp = tp
        elif self._latest_tp is None:
            self._latest_tp = tp
        stored = self.stored.get(tp)
        return stored is None or offset >= stored

    # -- reads and writes (called by Table) -----------------------------------------------
    def read_raw(self, table: str, kb: bytes) -> Tuple[Any, Optional[bytes]]:
        """``(value or MISSING, serialized)`` of a key: write cache, then batches in
        flight (newest first), then LMDB.  ``value`` is the Python object when the cache
        has one that decodes to itself, else MISSING and the caller decodes."""
        entry = self._cache[table].get(kb)
        if entry is not None:
            return entry[0], entry[1]
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
        cache = self._cache[table.name]
        if kb not in cache:  # first write of this key in the batch: check it once
            self.check_key(table, key, kb, ctx.key)
        if not ctx.writable:
            return
        if encoded is not None:
            raw: Optional[bytes] = encoded
        else:
            raw = None if value is None else table._encode_value(value)
        if raw is None:
            value = None
        else:  # too large for its changelog: the record that wrote it fails, not the batch
            check_fits(table.changelog_topic, kb, raw, self.max_message_bytes)
        undo_key = (table.name, kb)
        if undo_key not in self.undo:
            self.undo[undo_key] = cache.get(kb)
        cache[kb] = (value, raw, (ctx.topic, ctx.partition))  # type: ignore[assignment]

    def rollback_record(self) -> None:
        """Takes back every write of the current record and the stream time it moved (it
        failed and is dead-lettered or skipped: a failed record leaves the tables and the
        window expiry as they were; DESIGN.md, "State (LMDB)")."""
        self.latest_ms, self._latest_tp = self._time_before
        for (table, kb), before in self.undo.items():
            if before is None:
                self._cache[table].pop(kb, None)
            else:
                self._cache[table][kb] = before
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
        overlay: Dict[bytes, Optional[bytes]] = {}
        for batch in self.inflight:
            overlay.update(batch.writes.get(table, {}))
        for kb, entry in self._cache[table].items():
            overlay[kb] = entry[1]
        for kb, raw in self.store.items(table):
            if kb not in overlay:
                yield kb, raw
        for kb, raw in sorted(overlay.items()):
            if raw is not None:
                yield kb, raw

    def range_raw(self, table: str, lo: bytes, hi: bytes) -> Dict[bytes, Optional[bytes]]:
        """``{key: serialized value or None (deleted)}`` of the keys ``lo <= key < hi`` as
        this task sees them now: LMDB overlaid with the batches in flight and the write
        cache (a scan of the cache: for batch ends, not for every record)."""
        found: Dict[bytes, Optional[bytes]] = dict(self.store.range_items(table, lo, hi))
        for batch in self.inflight:
            for kb, raw in batch.writes.get(table, {}).items():
                if lo <= kb < hi:
                    found[kb] = raw
        for kb, entry in self._cache[table].items():
            if lo <= kb < hi:
                found[kb] = entry[1]
        return found

    def stage(self, table: str, kb: bytes, value: Any, raw: Optional[bytes]) -> None:
        """Stages a write made by the batch end itself (no current record: closing or
        expiring windows), with the batch's stream time like every write of the batch."""
        tp = self._latest_tp or next(iter(self.pending), None) or next(iter(self.stored), ("", 0))
        self._cache[table][kb] = (value, raw, tp)

    # -- batch end ----------------------------------------------------------------------
    def dirty_keys(self) -> int:
        """Keys in the write cache (changed since the last drain)."""
        return sum(len(cache) for cache in self._cache.values())

    def drain(self, input_offsets: Optional[Mapping[TP, int]] = None) -> DrainedBatch:
        """Ends the batch: empties the write cache into a :class:`DrainedBatch` (one
        changelog record and one LMDB write per dirty key, plus tombstones for expired
        windows).  ``input_offsets`` (next offset per partition) adds the worker's own
        positions to those of the records seen.  Reads keep seeing the batch until it is
        committed."""
        offsets = dict(self.pending)
        for tp, nxt in (input_offsets or {}).items():
            if offsets.get(tp, -1) < nxt:
                offsets[tp] = nxt
        finals = self._close()
        self._expire()
        headers: Dict[TP, List[Tuple[str, bytes]]] = {}
        origins = self.origins.drain()

        def header_for(tp: TP) -> List[Tuple[str, bytes]]:
            h = headers.get(tp)
            if h is None:
                last = offsets.get(tp, self.stored.get(tp, 0)) - 1
                h = headers[tp] = batch_headers(tp, last, self.stored.get(tp, 0),
                                                self.latest_ms)
            return h

        records: List[ChangelogRecord] = []
        writes: Dict[str, Dict[bytes, Optional[bytes]]] = {}
        values: Dict[str, Dict[bytes, Any]] = {}
        for name, cache in self._cache.items():
            if not cache:
                continue
            topic = self.tables[name].changelog_topic
            part = self.partition
            table_writes: Dict[bytes, Optional[bytes]] = {}
            table_values: Dict[bytes, Any] = {}
            for kb, (value, raw, tp) in cache.items():
                table_writes[kb] = raw
                table_values[kb] = value
                records.append(ChangelogRecord(name, topic, part, kb, raw, header_for(tp)))
            writes[name] = table_writes
            values[name] = table_values
            self._cache[name] = {}
        if records and self.origins.seen:
            # every origin mark so far rides on the batch's first changelog record: the
            # newest batch survives compaction, so a restore finds them all (DESIGN.md,
            # "Sub-topologies", "Origins")
            first = records[0]
            records[0] = first._replace(headers=first.headers + [
                (HDR_ORIGINS, encode_marks(self.origins.seen))])
        batch = DrainedBatch(self, records, writes, offsets, self.latest_ms, values, origins,
                             finals)
        self.pending = {}
        self.inflight.append(batch)
        return batch

    def _close(self) -> List["FinalRecord"]:
        """The final records of every window of a table with ``on_close`` that closed
        since the last drain: those starting in ``[close_bound(stream time at the last
        drain), close_bound(stream time now))``, in storage-key order (start, then key),
        with their values as this batch leaves them.  Each closed window not written in
        this batch is written again (same value, or its expiry's tombstone): the batch's
        changelog records then carry its stream time, so a task restored from the
        changelog knows these windows are closed and emits them never again."""
        from .windows import split_window_key, window_key

        finals: List["FinalRecord"] = []
        latest = self.latest_ms
        for name, table in self.tables.items():
            window, closer = table.window, table.closer
            if hasattr(window, "end_of_batch"):  # sessions, sliding: their own layout
                finals.extend(window.end_of_batch(self, table, self._closed_time, latest))
                continue
            if window is None or closer is None:
                continue
            lo = window.close_bound(self._closed_time)
            hi = window.close_bound(latest)
            if hi <= lo:
                continue
            found = self.range_raw(name, window_key(lo, b""), window_key(hi, b""))
            cache = self._cache[name]
            for kb in sorted(found):
                raw = found[kb]
                if raw is None:
                    continue
                start, keyb = split_window_key(kb)
                value = table._decode_value(raw)
                finals.extend(closer.finals(table._decode_key(keyb), start,
                                            start + window.size_ms, value))
                if kb not in cache:
                    self.stage(name, kb, value, raw)
        self._closed_time = latest
        return finals

    def _expire(self) -> None:
        """Turns every window that expired (its end + ``expires`` <= the latest timestamp
        seen) into a deletion in the write cache: a tombstone in the changelog and a
        delete in LMDB.  Expired windows that were only ever in the cache just vanish."""
        latest = self.latest_ms
        if latest is None:
            return
        for name, table in self.tables.items():
            expiry = None if table.window is None else table.window.expiry_bound(latest)
            if expiry is None:
                continue
            upto, bound = expiry
            cache = self._cache[name]
            tp = self._latest_tp or next(iter(self.pending), None) or next(iter(self.stored), ("", 0))
            for kb in [kb for kb in cache if kb < bound]:
                del cache[kb]
            stored_before = self._expired_upto.get(name)
            candidates: Dict[bytes, None] = {}
            for batch in self.inflight:
                for kb, raw in batch.writes.get(name, {}).items():
                    if kb < bound and raw is not None:
                        candidates[kb] = None
            if stored_before is None or upto > stored_before:
                for kb, _raw in self.store.first_items(name, bound):
                    candidates[kb] = None
                self._expired_upto[name] = upto
            for kb in candidates:
                if self._exists_outside_cache(name, kb):
                    cache[kb] = (None, None, tp)

    def _exists_outside_cache(self, table: str, kb: bytes) -> bool:
        for batch in reversed(self.inflight):
            writes = batch.writes.get(table)
            if writes is not None and kb in writes:
                return writes[kb] is not None
        return self.store.get(table, kb) is not None

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
        for name in self._cache:
            self._cache[name] = {}
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
