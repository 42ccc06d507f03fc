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
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Tuple, Union

from .tasktables import MISSING, TableContext, TaskTables

if TYPE_CHECKING:
    from .tables import Table

__all__ = ["Seconds", "Window", "WindowedTable", "WindowSet", "window_key", "split_window_key"]

Seconds = Union[int, float, timedelta]
_START = struct.Struct(">Q")


def _ms(value: Seconds) -> int:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    return int(round(seconds * 1000))


class Window:
    """Epoch-aligned windows of ``size`` every ``step`` (tumbling: step == size), as in
    Kafka Streams: window ``[start, start + size)`` with ``start`` a multiple of
    ``step``; windows starting before the epoch do not exist.  ``expires``: how long
    after its end (relative to the latest record timestamp the task saw) a window is
    kept; None keeps windows forever."""

    def __init__(self, size: Seconds, step: Seconds, expires: Optional[Seconds] = None) -> None:
        self.size_ms = _ms(size)
        self.step_ms = _ms(step)
        self.expires_ms = None if expires is None else _ms(expires)
        if self.size_ms <= 0 or self.step_ms <= 0:
            raise ValueError("window size and step must be positive")
        if self.step_ms > self.size_ms:
            raise ValueError("a hopping window's step must not exceed its size (gaps)")
        if self.expires_ms is not None and self.expires_ms < 0:
            raise ValueError("expires must not be negative")

    def __repr__(self) -> str:
        kind = "tumbling" if self.step_ms == self.size_ms else f"hopping step={self.step_ms}ms"
        return f"<Window {kind} size={self.size_ms}ms expires={self.expires_ms}>"

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


def window_key(start_ms: int, kb: bytes) -> bytes:
    """Storage key of a window: 8-byte big-endian start (epoch ms), then the key bytes."""
    return _START.pack(start_ms) + kb


def split_window_key(storage_key: bytes) -> Tuple[int, bytes]:
    """``(start_ms, key bytes)`` of a window's storage key."""
    return _START.unpack_from(storage_key)[0], storage_key[8:]


class WindowedTable:
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
      expired read as missing; late records do not change expired windows (Kafka
      Streams drops records past the grace period in the same way).
    """

    def __init__(self, table: Table, window: Window, relative_to_now: bool = False) -> None:
        self.table = table
        self.window = window
        self._relative_to_now = relative_to_now

    def __repr__(self) -> str:
        return f"<WindowedTable {self.table.name} {self.window}>"

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def changelog_topic(self) -> str:
        return self.table.changelog_topic

    def relative_to_now(self) -> "WindowedTable":
        """A view whose ``.value()`` uses the wall clock (Faust's ``relative_to_now``)."""
        return WindowedTable(self.table, self.window, relative_to_now=True)

    def relative_to_stream(self) -> "WindowedTable":
        """A view whose ``.value()`` uses the current record's timestamp (the default)."""
        return WindowedTable(self.table, self.window, relative_to_now=False)

    # -- internals --------------------------------------------------------------------
    def _ctx(self) -> Tuple[TableContext, TaskTables]:
        ctx = self.table._context
        return ctx, ctx.current_task()

    def _timestamp(self, ctx: TableContext) -> int:
        ts = ctx.timestamp_ms
        return int(time.time() * 1000) if ts is None else ts

    def _get(self, task: TaskTables, kb: bytes, start: int) -> Any:
        if self.window.expired(start, task.latest_ms):
            return MISSING
        return self.table._read(task, window_key(start, kb))

    def _value_or_default(self, value: Any) -> Any:
        if value is MISSING:
            return self.table.default() if self.table.default is not None else None
        return value

    def _set(self, ctx: TableContext, task: TaskTables, key: Any, kb: bytes, start: int,
             value: Any) -> None:
        if self.window.expired(start, task.latest_ms):
            return
        task.write(self.table, window_key(start, kb), key, value, ctx)

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
