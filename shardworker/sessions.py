"""Session windows (``table.session(gap)``): a key's records less than ``gap`` apart
form one session; a record that bridges two sessions merges them.  Also the storage
layout that session and sliding windows (:mod:`shardworker.sliding`) share.

Layout, in the table's own LMDB database and changelog (DESIGN.md, "Windows and time"):

* ``b"S" + len(key) (2 bytes) + key + start (8 bytes)`` → the value (the table's value
  serializer): one entry per session (sliding windows: per record time, a *bucket*);
* ``b"D" + key`` → the key's directory, JSON ``[[start, end], ...]`` (epoch ms, sorted):
  a record finds the sessions it touches with one read (write cache, batches in flight,
  then LMDB, as every table read), never a scan;
* ``b"T" + end (8 bytes) + key`` → ``start`` (8 bytes): the time index, so the sessions
  that close or expire at a batch end are a key range.

Every change is whole-value writes of these entries in the write cache: a merge deletes
the merged sessions' ``S`` and ``T`` entries and writes the merged session's entries and
the key's directory.  A batch's writes reach LMDB in one transaction and its changelog
records are applied by restore only as a whole batch, so a crash (kill -9) anywhere
leaves the sessions as some committed batch left them, and the records after it are
processed again from there.
"""
from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from .tablecontext import MISSING, TableContext, TableError
from .tasktables import TaskTables
from .windows import InPlaceOperators, Seconds, WindowView, _ms

if TYPE_CHECKING:
    from .tables import Table
    from .windowclose import FinalRecord

__all__ = ["SessionWindows", "SessionTable", "SessionView", "TimeKeyedLayout", "sum_merge"]

_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")
Interval = Tuple[int, int]
Merge = Callable[[Any, Any], Any]


def sum_merge(a: Any, b: Any) -> Any:
    """The default ``merge``: the sum of two numbers (counts, sums).  Other values need
    a ``merge=`` function: raises :class:`TableError`."""
    numbers = (int, float)
    if (isinstance(a, numbers) and isinstance(b, numbers)
            and not isinstance(a, bool) and not isinstance(b, bool)):
        return a + b
    raise TableError(f"cannot merge {a!r} and {b!r}: pass merge=fn(a, b) for values that "
                     "are not numbers")


class TimeKeyedLayout:
    """The ``S``/``D``/``T`` entries of one key-and-time windowed table (see the module
    docstring) and the reads and writes a record or a batch end makes on them."""

    def __init__(self, merge: Optional[Merge]) -> None:
        self.merge: Merge = merge or sum_merge

    # -- storage keys -------------------------------------------------------------------
    @staticmethod
    def value_key(kb: bytes, start: int) -> bytes:
        return b"S" + _U16.pack(len(kb)) + kb + _U64.pack(start)

    @staticmethod
    def dir_key(kb: bytes) -> bytes:
        return b"D" + kb

    @staticmethod
    def time_key(end: int, kb: bytes) -> bytes:
        return b"T" + _U64.pack(end) + kb

    @staticmethod
    def time_bound(end: int) -> bytes:
        return b"T" + _U64.pack(max(0, end))

    # -- reads ----------------------------------------------------------------------------
    def intervals(self, task: TaskTables, table: "Table", kb: bytes) -> List[Interval]:
        """The key's stored ``(start, end)`` intervals, oldest first."""
        _value, raw = task.read_raw(table.name, self.dir_key(kb))
        if raw is None:
            return []
        return [(int(s), int(e)) for s, e in json.loads(raw)]

    def value(self, task: TaskTables, table: "Table", kb: bytes, start: int) -> Any:
        return table._read(task, self.value_key(kb, start))

    def fold(self, values: List[Any]) -> Any:
        """``merge`` over ``values`` in order (MISSING when there are none)."""
        out = MISSING
        for value in values:
            out = value if out is MISSING else self.merge(out, value)
        return out

    # -- a record's writes ------------------------------------------------------------------
    def replace(self, task: TaskTables, table: "Table", ctx: TableContext, key: Any,
                kb: bytes, stored: List[Interval], gone: List[Interval],
                new: Interval, value: Any) -> None:
        """Deletes the intervals ``gone`` (of ``stored``, the key's directory) and writes
        ``new`` with ``value``: whole-value writes of S, T and D entries."""
        for start, end in gone:
            if start != new[0]:
                task.write(table, self.value_key(kb, start), key, None, ctx)
            if end != new[1]:
                task.write(table, self.time_key(end, kb), key, None, ctx)
        task.write(table, self.value_key(kb, new[0]), key, value, ctx)
        task.write(table, self.time_key(new[1], kb), key, MISSING, ctx,
                   encoded=_U64.pack(new[0]))
        kept = sorted([iv for iv in stored if iv not in gone] + [new])
        task.write(table, self.dir_key(kb), key, MISSING, ctx, encoded=_dir_bytes(kept))

    # -- batch end -----------------------------------------------------------------------
    def due(self, task: TaskTables, table: "Table", lo_end: int,
            hi_end: int) -> List[Tuple[int, int, bytes]]:
        """``(end, start, key bytes)`` of the stored intervals with ``lo_end <= end <
        hi_end``, in (end, key) order."""
        if hi_end <= max(0, lo_end):
            return []
        found = task.range_raw(table.name, self.time_bound(lo_end), self.time_bound(hi_end))
        out = []
        for tk in sorted(found):
            raw = found[tk]
            if raw is not None:
                out.append((_U64.unpack_from(tk, 1)[0], _U64.unpack(raw)[0], tk[9:]))
        return out

    def rewrite(self, task: TaskTables, table: "Table", kb: bytes, start: int) -> None:
        """Writes an interval's value again as it is (its batch's changelog records then
        carry the stream time that closed it: a task restored from the changelog does not
        close it again)."""
        vk = self.value_key(kb, start)
        value, raw = task.read_raw(table.name, vk)
        if raw is not None:
            task.stage(table.name, vk, value, raw)

    def delete(self, task: TaskTables, table: "Table", kb: bytes, start: int, end: int) -> None:
        """Deletes one stored interval (its S and T entries, and it from the directory)."""
        name = table.name
        task.stage(name, self.value_key(kb, start), None, None)
        task.stage(name, self.time_key(end, kb), None, None)
        kept = [iv for iv in self.intervals(task, table, kb) if iv != (start, end)]
        task.stage(name, self.dir_key(kb), MISSING, _dir_bytes(kept) if kept else None)

    @staticmethod
    def stored(items: Iterator[Tuple[bytes, bytes]]) -> List[Tuple[bytes, int, int, bytes]]:
        """``(key bytes, start, end, serialized value)`` of every interval in a table's
        raw LMDB entries (``shardsup table``, which reads a stopped task's store)."""
        ends: Dict[Tuple[bytes, int], int] = {}
        values: List[Tuple[bytes, int, bytes]] = []
        for sk, raw in items:
            if sk[:1] == b"T":
                ends[(sk[9:], _U64.unpack(raw)[0])] = _U64.unpack_from(sk, 1)[0]
            elif sk[:1] == b"S":
                n = _U16.unpack_from(sk, 1)[0]
                values.append((sk[3:3 + n], _U64.unpack_from(sk, 3 + n)[0], raw))
        return [(kb, start, ends.get((kb, start), start), raw) for kb, start, raw in values]

    def iter_intervals(self, task: TaskTables, table: "Table") -> Iterator[Tuple[bytes, Interval]]:
        """``(key bytes, (start, end))`` of every stored interval of the task."""
        for dk, raw in task.iter_raw(table.name):
            if dk[:1] == b"D":
                for s, e in json.loads(raw):
                    yield dk[1:], (int(s), int(e))


def _dir_bytes(intervals: List[Interval]) -> bytes:
    return json.dumps([list(iv) for iv in intervals], separators=(",", ":")).encode()


class SessionWindows:
    """Session windows of ``gap`` (a :class:`~shardworker.tables.Table`'s ``window`` once
    :meth:`Table.session <shardworker.tables.Table.session>` made it one).

    A session ``[start, end]`` spans its records' times (end included); a record at
    ``t`` joins every open session of its key with ``end > t - gap`` and ``start < t +
    gap`` (merging them when there are several).  Relative to the task's stream time
    ``L``: a record with ``t + grace < L`` is *late* (dropped, counted; ``on_late="dlq"``
    also dead-letters it); a session *closes* once ``end + gap + grace <= L`` (no record
    that is not late can touch it any more: its final value is produced); it is deleted
    when it closes, or at ``end + gap + expires`` when ``expires`` is given.

    DESIGN.md, "Windows and time"."""

    def __init__(self, gap: Seconds, grace: Seconds = 0, expires: Optional[Seconds] = None,
                 merge: Optional[Merge] = None) -> None:
        self.gap_ms = _ms(gap)
        self.grace_ms = _ms(grace)
        self.expires_ms = self.grace_ms if expires is None else _ms(expires)
        if self.gap_ms <= 0:
            raise ValueError("a session gap must be positive")
        if self.grace_ms < 0:
            raise ValueError("grace must not be negative")
        if self.expires_ms < self.grace_ms:
            raise ValueError("expires must be at least grace (a session would be deleted "
                             "before it closed)")
        self.layout = TimeKeyedLayout(merge)

    def __repr__(self) -> str:
        return (f"<SessionWindows gap={self.gap_ms}ms grace={self.grace_ms}ms "
                f"expires={self.expires_ms}ms>")

    def expiry_bound(self, latest_ms: int) -> None:
        """None: the task's generic window expiry does not apply (see
        :meth:`end_of_batch`)."""
        return None

    def late(self, ts_ms: int, latest_ms: Optional[int]) -> bool:
        return latest_ms is not None and ts_ms + self.grace_ms < latest_ms

    def closed(self, end_ms: int, latest_ms: Optional[int]) -> bool:
        return latest_ms is not None and end_ms + self.gap_ms + self.grace_ms <= latest_ms

    def _close_end(self, latest_ms: Optional[int]) -> int:
        """Every session ending before the returned time is closed at ``latest_ms``."""
        return 0 if latest_ms is None else latest_ms - self.gap_ms - self.grace_ms + 1

    def _expiry_end(self, latest_ms: Optional[int]) -> int:
        return 0 if latest_ms is None else latest_ms - self.gap_ms - self.expires_ms + 1

    def end_of_batch(self, task: TaskTables, table: "Table", before_ms: Optional[int],
                     latest_ms: Optional[int]) -> List["FinalRecord"]:
        """At a batch end (stream time ``before_ms`` at the last one, ``latest_ms`` now):
        the final records of the sessions that closed since, in (end, key) order, then
        the deletion of those that expired."""
        layout, closer = self.layout, table.closer
        finals: List["FinalRecord"] = []
        if closer is not None:
            for end, start, kb in layout.due(task, table, self._close_end(before_ms),
                                             self._close_end(latest_ms)):
                value = layout.value(task, table, kb, start)
                if value is MISSING:
                    continue
                finals.extend(closer.finals(table._decode_key(kb), start, end, value))
                layout.rewrite(task, table, kb, start)
        for end, start, kb in layout.due(task, table, self._expiry_end(before_ms),
                                         self._expiry_end(latest_ms)):
            layout.delete(task, table, kb, start, end)
        return finals


class SessionTable(WindowView):
    """A table of session windows: ``st[k]`` is a :class:`SessionView` of key ``k`` at
    the current record's time.

    * ``st[k] += x`` (any in-place operator), ``st[k].apply(fn)``, ``st[k] = v``: the
      record joins (or starts) its session, merging the sessions it bridges: their
      values combine with ``merge(a, b)`` (oldest first; default: the sum of numbers),
      then the operator applies to the result (a new session starts from ``default()``).
    * ``st[k].current()`` / ``.value()``: the value of the session containing the
      current record's time (the default when there is none); ``.window()``: its
      ``(start, end)`` in epoch seconds, or None.
    * :meth:`on_close`: each session's final value goes to a topic when it closes.
    """

    def __init__(self, table: "Table", window: SessionWindows) -> None:
        super().__init__(table, window)

    def __repr__(self) -> str:
        return f"<SessionTable {self.table.name} {self.window}>"

    def on_close(self, target: Any, sink: Any = ()) -> "SessionTable":
        """As :meth:`WindowedTable.on_close <shardworker.windows.WindowedTable.on_close>`:
        a closed session's final value ``{"start": s, "end": e, "value": v}`` (seconds;
        ``end`` is the session's last record time, included), or ``fn(key, (start,
        end), value)``'s values, go to the sink."""
        self._close_to(target, sink)
        return self

    def _touching(self, task: TaskTables, kb: bytes,
                  ts: int) -> Tuple[List[Interval], List[Interval]]:
        """The key's directory, and the open sessions a record at ``ts`` joins."""
        w = self.window
        stored = w.layout.intervals(task, self.table, kb)
        joins = [(s, e) for s, e in stored
                 if e > ts - w.gap_ms and s < ts + w.gap_ms and not w.closed(e, task.latest_ms)]
        return stored, joins

    def _update(self, key: Any, op: Callable[[Any], Any]) -> None:
        ctx, task = self._ctx()
        table, w = self.table, self.window
        ts = ctx.timestamp_ms
        assert ts is not None
        if self._dropped_as_late(ctx, task, w.late(ts, task.latest_ms)):
            return
        kb = table._key_bytes(key)
        stored, joins = self._touching(task, kb, ts)
        if joins:
            value = w.layout.fold([w.layout.value(task, table, kb, s) for s, _e in joins])
            value = self._default() if value is MISSING else value
            new = (min(ts, joins[0][0]), max(ts, joins[-1][1]))
        else:
            value, new = self._default(), (ts, ts)
        w.layout.replace(task, table, ctx, key, kb, stored, joins, new, op(value))

    def _containing(self, key: Any) -> Tuple[Optional[Interval], Any]:
        ctx, task = self._ctx()
        ts = ctx.timestamp_ms
        kb = self.table._key_bytes(key)
        for s, e in self.window.layout.intervals(task, self.table, kb):
            if s <= (ts or 0) <= e:
                return (s, e), self.window.layout.value(task, self.table, kb, s)
        return None, MISSING

    def __getitem__(self, key: Any) -> "SessionView":
        return SessionView(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, SessionView):
            return  # `st[k] += 1`: the in-place operator already updated the session
        self._update(key, lambda _old: value)

    def items(self) -> Iterator[Tuple[Tuple[Any, Tuple[float, float]], Any]]:
        """``((key, (start, end)), value)`` of every stored session of the current task
        (epoch seconds, end included)."""
        _ctx, task = self._ctx()
        table, layout = self.table, self.window.layout
        for kb, (s, e) in list(layout.iter_intervals(task, table)):
            value = layout.value(task, table, kb, s)
            if value is not MISSING:
                yield (table._decode_key(kb), (s / 1000.0, e / 1000.0)), value


class SessionView(InPlaceOperators):
    """The session of one key at the current record's time."""

    def __init__(self, stable: SessionTable, key: Any) -> None:
        self.stable = stable
        self.key = key

    def __repr__(self) -> str:
        return f"<SessionView {self.stable.name}[{self.key!r}]>"

    def current(self) -> Any:
        """The value of the session containing the current record's time (default)."""
        _iv, value = self.stable._containing(self.key)
        return self.stable._default() if value is MISSING else value

    value = current

    def window(self) -> Optional[Tuple[float, float]]:
        """``(start, end)`` in epoch seconds of that session, or None."""
        iv, _value = self.stable._containing(self.key)
        return None if iv is None else (iv[0] / 1000.0, iv[1] / 1000.0)

    def apply(self, fn: Callable[[Any], Any]) -> "SessionView":
        """Joins the record's session (merging) and sets its value to ``fn(value)``."""
        self.stable._update(self.key, fn)
        return self
