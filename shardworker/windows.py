"""Windowed tables (``table.tumbling(size)``, ``table.hopping(size, step)``): the window
arithmetic, the storage key of a window, and the views an agent uses
(:class:`WindowedTable`, :class:`WindowSet`).

Each window is stored under a time-first key: 8-byte big-endian window start (epoch
milliseconds) then the key's bytes (Kafka Streams' ``TimeFirstWindowKeySchema``), so
expired windows are a key range at the start of the table's database
(:meth:`Window.expiry_bound`; the task's tables delete them at the end of a batch).
"""
from __future__ import annotations

import struct
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Tuple, Union

from .tablecontext import MISSING, TableContext
from .tasktables import TaskTables

if TYPE_CHECKING:
    from .tables import Table

__all__ = ["Seconds", "Window", "WindowView", "WindowedTable", "WindowSet", "window_key", "split_window_key",
           "event_time_ms"]

Seconds = Union[int, float, timedelta]
_START = struct.Struct(">Q")


def _ms(value: Seconds) -> int:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    return int(round(seconds * 1000))


class Window:
    """Epoch-aligned windows of ``size`` every ``step`` (tumbling: step == size), as in
    Kafka Streams: window ``[start, start + size)`` with ``start`` a multiple of
    ``step``; windows starting before the epoch do not exist.

    Times are relative to the task's stream time (the latest event time it processed):

    * ``grace``: a window *closes* once stream time reaches its end + ``grace``; a record
      for a closed window is late (not added).  None: a window closes when it expires
      (and never when it does not expire).
    * ``expires``: how long after its end a window is kept; None keeps windows forever.
      It must be at least ``grace`` (a window is never deleted before it closed).

    DESIGN.md, "Windows and time"."""

    def __init__(self, size: Seconds, step: Seconds, expires: Optional[Seconds] = None,
                 grace: Optional[Seconds] = None) -> None:
        self.size_ms = _ms(size)
        self.step_ms = _ms(step)
        self.expires_ms = None if expires is None else _ms(expires)
        self.grace_ms = None if grace is None else _ms(grace)
        if self.size_ms <= 0 or self.step_ms <= 0:
            raise ValueError("window size and step must be positive")
        if self.step_ms > self.size_ms:
            raise ValueError("a hopping window's step must not exceed its size (gaps)")
        if self.expires_ms is not None and self.expires_ms < 0:
            raise ValueError("expires must not be negative")
        if self.grace_ms is not None and self.grace_ms < 0:
            raise ValueError("grace must not be negative")
        if (self.grace_ms is not None and self.expires_ms is not None
                and self.expires_ms < self.grace_ms):
            raise ValueError("expires must be at least grace (a window would be deleted "
                             "before it closed)")

    def __repr__(self) -> str:
        kind = "tumbling" if self.step_ms == self.size_ms else f"hopping step={self.step_ms}ms"
        return (f"<Window {kind} size={self.size_ms}ms grace={self.grace_ms} "
                f"expires={self.expires_ms}>")

    @property
    def close_after_ms(self) -> Optional[int]:
        """How long after its end a window closes: ``grace``, else ``expires`` (None:
        windows never close)."""
        return self.grace_ms if self.grace_ms is not None else self.expires_ms

    def closed(self, start_ms: int, latest_ms: Optional[int]) -> bool:
        """True when the window starting at ``start_ms`` is closed at stream time
        ``latest_ms`` (its end + grace <= stream time): records for it are late."""
        after = self.close_after_ms
        return (after is not None and latest_ms is not None
                and start_ms + self.size_ms + after <= latest_ms)

    def close_bound(self, latest_ms: Optional[int]) -> int:
        """At stream time ``latest_ms``: every window starting before the returned start
        is closed (0: none is; windows before the epoch do not exist)."""
        after = self.close_after_ms
        if after is None or latest_ms is None:
            return 0
        return max(0, latest_ms - self.size_ms - after + 1)

    def current(self, ts_ms: int) -> int:
        """Start of the latest window containing ``ts_ms``."""
        return ts_ms - ts_ms % self.step_ms

    def ranges(self, ts_ms: int) -> List[int]:
        """Starts of every window containing ``ts_ms`` (one when tumbling), oldest first."""
        start = self.current(ts_ms)
        starts = []
        while start > ts_ms - self.size_ms and start >= 0:
            starts.append(start)
            start -= self.step_ms
        starts.reverse()
        return starts

    def expired(self, start_ms: int, latest_ms: Optional[int]) -> bool:
        """True when the window starting at ``start_ms`` has expired."""
        return (self.expires_ms is not None and latest_ms is not None
                and start_ms + self.size_ms + self.expires_ms <= latest_ms)

    def expiry_bound(self, latest_ms: int) -> Optional[Tuple[int, bytes]]:
        """``(start, storage key)`` at stream time ``latest_ms``: every window starting
        before ``start`` has expired, and so has every stored key below the storage key;
        None when no window can have expired yet (or windows never expire)."""
        if self.expires_ms is None:
            return None
        # expired iff start + size + expires <= latest  <=>  start < upto
        upto = latest_ms - self.size_ms - self.expires_ms + 1
        if upto <= 0:
            return None
        return upto, window_key(upto, b"")


def event_time_ms(when: Any) -> int:
    """Epoch milliseconds of an event time given as seconds since the epoch (int or
    float) or a ``datetime`` (naive: UTC).  Raises ValueError for anything else, or a
    time before the epoch: the record then fails like one that does not decode."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp()
    elif isinstance(when, (int, float)) and not isinstance(when, bool):
        seconds = float(when)
    else:
        raise ValueError(f"an event time is seconds since the epoch or a datetime, not {when!r}")
    if not seconds >= 0 or seconds == float("inf"):  # also NaN
        raise ValueError(f"event time {when!r} is not a time since the epoch")
    return int(round(seconds * 1000))


def window_key(start_ms: int, kb: bytes) -> bytes:
    """Storage key of a window: 8-byte big-endian start (epoch ms), then the key bytes."""
    return _START.pack(start_ms) + kb


def split_window_key(storage_key: bytes) -> Tuple[int, bytes]:
    """``(start_ms, key bytes)`` of a window's storage key."""
    return _START.unpack_from(storage_key)[0], storage_key[8:]


class WindowView:
    """What every windowed view of a table shares (tumbling and hopping, session and
    sliding): its table and window, the current record's task, late records, and the
    final results on close."""

    def __init__(self, table: "Table", window: Any) -> None:
        self.table = table
        self.window = window

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def changelog_topic(self) -> str:
        return self.table.changelog_topic

    def late_records(self) -> int:
        """Records this child found late for this table (all its tasks, since it
        started): a write to a closed window, not applied."""
        return self.table.late_count

    def _ctx(self) -> Tuple[TableContext, TaskTables]:
        ctx = self.table._context
        return ctx, ctx.current_task()

    def _default(self) -> Any:
        return self.table.default() if self.table.default is not None else None

    def _dropped_as_late(self, ctx: TableContext, task: TaskTables, late: bool) -> bool:
        """``late``: the current record's write falls in a closed window.  Then it is
        counted (and under ``on_late="dlq"`` raises), unless the record is read again
        after its batch committed, and the write is dropped (True)."""
        if late and ctx.writable:
            task.note_late(self.table, ctx)
        return late

    def _close_to(self, target: Any, sink: Any) -> None:
        """Installs :meth:`on_close`'s target (a topic, or a function and its sinks)."""
        from .windowclose import WindowCloser

        sinks = list(sink) if isinstance(sink, (list, tuple)) else [sink]
        self.table.closer = WindowCloser(target, sinks)


class InPlaceOperators:
    """``view += x`` (and ``-=``, ``*=``, ``|=``) as ``view.apply(lambda v: v + x)``, for
    views whose value is updated through :meth:`apply` (session and sliding)."""

    def apply(self, fn: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def __iadd__(self, other: Any) -> Any:
        return self.apply(lambda a: a + other)

    def __isub__(self, other: Any) -> Any:
        return self.apply(lambda a: a - other)

    def __imul__(self, other: Any) -> Any:
        return self.apply(lambda a: a * other)

    def __ior__(self, other: Any) -> Any:
        return self.apply(lambda a: a | other)


class WindowedTable(WindowView):
    """A table of windows (Faust's ``WindowWrapper``): ``wt[k]`` is a :class:`WindowSet`
    of key ``k`` relative to the current record's timestamp.

    * ``wt[k] += 1`` (any in-place operator) updates EVERY window containing the current
      record's timestamp (one when tumbling, ``size/step`` when hopping); ``wt[k] = v``
      sets them, ``del wt[k]`` deletes them.
    * ``wt[k].current()``: the value in the latest window containing the current
      record's timestamp; ``.delta(s)``: the same for ``timestamp - s``; ``.now()``: for
      the wall clock; ``.value()``: for the table's *relative* timestamp, which is the
      current record's timestamp unless :meth:`relative_to_now` was called (Faust's
      ``relative_to_stream()`` default); so ``value() == current()`` by default.
    * Missing windows read as ``default()`` (or None without a default).  Windows that
      expired read as missing.  A record for a window that is closed (its end +
      ``grace`` is past the task's stream time) is *late*: it changes nothing, it is
      counted (:meth:`late_records`) and, with ``on_late="dlq"``, dead-lettered (Kafka
      Streams drops records past the grace period in the same way).
    * :meth:`on_close`: each window's final value goes to a topic once it closes.
    """

    def __init__(self, table: Table, window: Window, relative_to_now: bool = False) -> None:
        super().__init__(table, window)
        self._relative_to_now = relative_to_now

    def __repr__(self) -> str:
        return f"<WindowedTable {self.table.name} {self.window}>"

    def relative_to_now(self) -> "WindowedTable":
        """A view whose ``.value()`` uses the wall clock (Faust's ``relative_to_now``)."""
        return WindowedTable(self.table, self.window, relative_to_now=True)

    def relative_to_stream(self) -> "WindowedTable":
        """A view whose ``.value()`` uses the current record's timestamp (the default)."""
        return WindowedTable(self.table, self.window, relative_to_now=False)

    # -- internals --------------------------------------------------------------------
    def _timestamp(self, ctx: TableContext) -> int:
        ts = ctx.timestamp_ms
        return int(time.time() * 1000) if ts is None else ts

    def _get(self, task: TaskTables, kb: bytes, start: int) -> Any:
        if self.window.expired(start, task.latest_ms):
            return MISSING
        return self.table._read(task, window_key(start, kb))

    def _value_or_default(self, value: Any) -> Any:
        return self._default() if value is MISSING else value

    def _set(self, ctx: TableContext, task: TaskTables, key: Any, kb: bytes, start: int,
             value: Any) -> None:
        if self._dropped_as_late(ctx, task, self.window.closed(start, task.latest_ms)):
            return
        task.write(self.table, window_key(start, kb), key, value, ctx)

    def on_close(self, target: Any, sink: Any = ()) -> "WindowedTable":
        """When a window closes (stream time passed its end + grace), its final value
        is produced once: ``on_close(topic)`` sends ``{"start": s, "end": e, "value":
        v}`` (seconds) keyed by the table key; ``on_close(fn, sink=topic or [topics])``
        calls ``fn(key, (start, end), value)`` and sends what it returns (a value, a
        list of values) or yields.  Declare it with the table, before the app starts.
        Without ``grace`` and ``expires`` windows close at their end (grace 0); without
        ``expires``, a window is deleted when it closes.  DESIGN.md, "Windows and time"."""
        window = self.window
        if window.close_after_ms is None:
            window.grace_ms = 0
        if window.expires_ms is None:
            window.expires_ms = window.close_after_ms
        self._close_to(target, sink)
        return self

    # -- the mapping ------------------------------------------------------------------
    def __getitem__(self, key: Any) -> "WindowSet":
        return WindowSet(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, WindowSet):
            return  # `wt[k] += 1`: the in-place operator already updated the windows
        ctx, task = self._ctx()
        kb = self.table._key_bytes(key)
        for start in self.window.ranges(self._timestamp(ctx)):
            self._set(ctx, task, key, kb, start, value)

    def __delitem__(self, key: Any) -> None:
        ctx, task = self._ctx()
        kb = self.table._key_bytes(key)
        for start in self.window.ranges(self._timestamp(ctx)):
            if self._get(task, kb, start) is not MISSING:
                self._set(ctx, task, key, kb, start, None)

    def items(self) -> Iterator[Tuple[Tuple[Any, Tuple[float, float]], Any]]:
        """``((key, (start, end)), value)`` for every live window of the current task
        (start and end in epoch seconds, end exclusive), oldest windows first."""
        _ctx, task = self._ctx()
        table = self.table
        size = self.window.size_ms
        for skey, raw in task.iter_raw(table.name):
            start, kb = split_window_key(skey)
            if self.window.expired(start, task.latest_ms):
                continue
            yield ((table._decode_key(kb), (start / 1000.0, (start + size) / 1000.0)),
                   table._decode_value(raw))


class WindowSet:
    """The windows of one key, relative to the current record (Faust's ``WindowSet``)."""

    def __init__(self, wtable: WindowedTable, key: Any) -> None:
        self.wtable = wtable
        self.key = key

    def __repr__(self) -> str:
        return f"<WindowSet {self.wtable.name}[{self.key!r}]>"

    def _value_at(self, ts_ms: int) -> Any:
        wt = self.wtable
        _ctx, task = wt._ctx()
        kb = wt.table._key_bytes(self.key)
        return wt._value_or_default(wt._get(task, kb, wt.window.current(ts_ms)))

    def current(self) -> Any:
        """Value in the latest window containing the current record's timestamp."""
        ctx, _task = self.wtable._ctx()
        return self._value_at(self.wtable._timestamp(ctx))

    def now(self) -> Any:
        """Value in the latest window containing the wall-clock time."""
        return self._value_at(int(time.time() * 1000))

    def value(self) -> Any:
        """Value at the table's relative timestamp: the current record's (default) or the
        wall clock's after ``relative_to_now()``."""
        return self.now() if self.wtable._relative_to_now else self.current()

    def delta(self, seconds: Seconds) -> Any:
        """Value in the latest window containing ``current timestamp - seconds``."""
        ctx, _task = self.wtable._ctx()
        return self._value_at(self.wtable._timestamp(ctx) - _ms(seconds))

    def apply(self, fn: Callable[[Any], Any]) -> "WindowSet":
        """Sets every window containing the current record's timestamp to ``fn(old)``
        (``old``: its value, or the default): an aggregate of any JSON value, e.g.
        ``wt[k].apply(lambda a: {"n": a["n"] + 1, "sum": a["sum"] + x})``.  Each window
        gets its own new value (hopping windows hold different aggregates)."""
        return self._apply(lambda old, _other: fn(old), None)

    def _apply(self, op: Callable[[Any, Any], Any], other: Any) -> "WindowSet":
        wt = self.wtable
        ctx, task = wt._ctx()
        kb = wt.table._key_bytes(self.key)
        for start in wt.window.ranges(wt._timestamp(ctx)):
            old = wt._value_or_default(wt._get(task, kb, start))
            wt._set(ctx, task, self.key, kb, start, op(old, other))
        return self

    def __iadd__(self, other: Any) -> "WindowSet":
        return self._apply(lambda a, b: a + b, other)

    def __isub__(self, other: Any) -> "WindowSet":
        return self._apply(lambda a, b: a - b, other)

    def __imul__(self, other: Any) -> "WindowSet":
        return self._apply(lambda a, b: a * b, other)

    def __itruediv__(self, other: Any) -> "WindowSet":
        return self._apply(lambda a, b: a / b, other)

    def __ifloordiv__(self, other: Any) -> "WindowSet":
        return self._apply(lambda a, b: a // b, other)

    def __imod__(self, other: Any) -> "WindowSet":
        return self._apply(lambda a, b: a % b, other)

    def __ipow__(self, other: Any) -> "WindowSet":
        return self._apply(lambda a, b: a ** b, other)

    def __ior__(self, other: Any) -> "WindowSet":
        return self._apply(lambda a, b: a | b, other)

    def __iand__(self, other: Any) -> "WindowSet":
        return self._apply(lambda a, b: a & b, other)

    def __ixor__(self, other: Any) -> "WindowSet":
        return self._apply(lambda a, b: a ^ b, other)
