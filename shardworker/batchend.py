"""The end of one task's batch: its write cache drained into a :class:`DrainedBatch` (one
changelog record and one LMDB write per changed key), with the windows that closed
(their final records) and the windows that expired (their deletions).  What to do with
a drained batch is its docstring's: produce, then :meth:`DrainedBatch.commit`, in drain
order (the commit itself is :meth:`TaskTables._commit
<shardworker.tasktables.TaskTables._commit>`).

:class:`BatchEnd` is a part of :class:`~shardworker.tasktables.TaskTables` (which
inherits it), kept apart so that ``tasktables.py`` holds what happens per record; it
reads the task's write cache, batches in flight, offsets and stream time.

Rules implemented here (DESIGN.md, "State (LMDB)", "Windows and time"):

* **Whole values.**  Changelog records carry the whole value (never a delta), with the
  source partition and batch offset in headers (:mod:`shardworker.changelog`): the
  offset is the LAST input offset of that partition in the batch, so restore applies a
  record only when its whole batch is committed.
* **Window closing.**  At the end of a batch, each window of a table with ``on_close``
  that closed since the last batch end (relative to the task's stream time) becomes its
  final records, produced with the batch (:mod:`shardworker.windowclose`).
* **Window expiry.**  At the end of a batch, windows that expired (relative to the
  task's stream time) become deletions: tombstones in the changelog, deletes in LMDB.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from .changelog import ChangelogRecord, batch_headers
from .origins import HDR_ORIGINS, OriginMarks, encode_marks
from .store import TaskStore
from .tablecontext import UNENCODED

if TYPE_CHECKING:
    from .tables import Table
    from .tasktables import TaskTables
    from .windowclose import FinalRecord

__all__ = ["BatchEnd", "DrainedBatch", "TP"]

#: a topic partition: ``(topic, partition)``
TP = Tuple[str, int]


class DrainedBatch:
    """What one batch changed in one task: the changelog records to produce, the LMDB
    writes, and the input offsets they reflect.  Produce :attr:`records`, wait for the
    broker's acknowledgements, then :meth:`commit`.  Every drained batch of a task, empty
    ones included, is committed in drain order (or
    :meth:`~shardworker.tasktables.TaskTables.abort` drops them): a later batch's offsets
    must never reach LMDB before an earlier batch's state."""

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


class BatchEnd:
    """A batch end of one task (see the module docstring).  Attributes are the
    :class:`~shardworker.tasktables.TaskTables`'s."""

    # set by TaskTables.__init__
    store: TaskStore
    tables: Dict[str, "Table"]
    partition: int
    cache: Dict[str, Dict[bytes, Tuple[Any, Optional[bytes], TP]]]
    stored: Dict[TP, int]
    pending: Dict[TP, int]
    latest_ms: Optional[int]
    _latest_tp: Optional[TP]
    origins: OriginMarks
    _expired_upto: Dict[str, int]
    _closed_time: Optional[int]
    inflight: List[DrainedBatch]

    def range_raw(self, table: str, lo: bytes, hi: bytes) -> Dict[bytes, Optional[bytes]]:
        """``{key: serialized value or None (deleted)}`` of the keys ``lo <= key < hi`` as
        this task sees them now: LMDB overlaid with the batches in flight and the write
        cache (a scan of the cache: for batch ends, not for every record)."""
        found: Dict[bytes, Optional[bytes]] = dict(self.store.range_items(table, lo, hi))
        for kb, raw in self._uncommitted(table).items():
            if lo <= kb < hi:
                found[kb] = raw
        return found

    def raw_of(self, table: str, entry: Tuple[Any, Optional[bytes], TP]) -> Optional[bytes]:
        """The serialized value of a write cache entry of ``table`` (encoded now when the
        write deferred it: :data:`~shardworker.tablecontext.UNENCODED`)."""
        raw = entry[1]
        if raw is UNENCODED:
            return self.tables[table]._encode_value(entry[0])
        return raw

    def _uncommitted(self, table: str) -> Dict[bytes, Optional[bytes]]:
        """``{key: serialized value or None (deleted)}`` of what the batches in flight and
        the write cache changed in ``table`` (the newest write of each key)."""
        changed: Dict[bytes, Optional[bytes]] = {}
        for batch in self.inflight:
            changed.update(batch.writes.get(table, {}))
        raw_of = self.raw_of
        for kb, entry in self.cache[table].items():
            changed[kb] = raw_of(table, entry)
        return changed

    def stage(self, table: str, kb: bytes, value: Any, raw: Optional[bytes]) -> None:
        """Stages a write made by the batch end itself (no current record: closing or
        expiring windows), with the batch's stream time like every write of the batch."""
        self.cache[table][kb] = (value, raw, self._batch_source())

    def _batch_source(self) -> TP:
        """The source partition whose changelog headers a write of the batch end itself
        carries: the one whose record set the stream time, else any the task read."""
        return self._latest_tp or next(iter(self.pending), None) or next(iter(self.stored), ("", 0))

    def dirty_keys(self) -> int:
        """Keys in the write cache (changed since the last drain)."""
        return sum(len(cache) for cache in self.cache.values())

    def drain(self, input_offsets: Optional[Mapping[TP, int]] = None) -> DrainedBatch:
        """Ends the batch: empties the write cache into a :class:`DrainedBatch` (one
        changelog record and one LMDB write per dirty key, plus tombstones for expired
        windows).  ``input_offsets``: the next offset per partition read since the last
        drain (the worker's positions), with those of records made current by hand
        (``pending``: ``TableContext.set_record``).  Reads keep seeing the batch until it
        is committed."""
        offsets = dict(self.pending)
        for tp, nxt in (input_offsets or {}).items():
            if offsets.get(tp, -1) < nxt:
                offsets[tp] = nxt
        self.pending = offsets  # the batch's partitions, for _batch_source's writes below
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
        for name, cache in self.cache.items():
            if not cache:
                continue
            topic = self.tables[name].changelog_topic
            part = self.partition
            table_writes: Dict[bytes, Optional[bytes]] = {}
            table_values: Dict[bytes, Any] = {}
            raw_of = self.raw_of
            for kb, entry in cache.items():
                value, raw, tp = entry[0], raw_of(name, entry), entry[2]
                table_writes[kb] = raw
                table_values[kb] = value
                records.append(ChangelogRecord(name, topic, part, kb, raw, header_for(tp)))
            writes[name] = table_writes
            values[name] = table_values
            self.cache[name] = {}
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
            cache = self.cache[name]
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
            cache = self.cache[name]
            tp = self._batch_source()
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
