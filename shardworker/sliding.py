"""Sliding windows (``table.sliding(size, grace=...)``): one window per record time.

The subset of Kafka Streams' ``SlidingWindows`` (and Quix Streams' sliding windows)
implemented here: each record time ``t`` of a key defines the window ``[t - size, t]``
(both ends included) holding every record of that key with a time in it; records at the
same time share their window.  Kafka Streams also emits the *right* windows ``[t + 1,
t + 1 + size]`` (what remains once a record slides out); those are not produced here.

Storage reuses the session layout (:class:`~shardworker.sessions.TimeKeyedLayout`): one
*bucket* per key and record time (the aggregate of that key's records at that time), a
per-key directory of bucket times, and the time index.  A window's value is the
``merge`` (default: the sum) of its buckets, oldest first, computed when it is read or
closes.  DESIGN.md, "Windows and time".
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional

from .sessions import Merge, TimeKeyedLayout
from .tablecontext import MISSING
from .tasktables import TaskTables
from .windows import InPlaceOperators, Seconds, WindowView, _ms

if TYPE_CHECKING:
    from .tables import Table
    from .windowclose import FinalRecord

__all__ = ["SlidingWindows", "SlidingTable", "SlidingView"]


class SlidingWindows:
    """Sliding windows of ``size`` (a table's ``window`` once :meth:`Table.sliding
    <shardworker.tables.Table.sliding>` made it one).  Relative to the task's stream time
    ``L``: a record with ``t + grace < L`` is late (its own window is closed: dropped,
    counted); the window ending at ``t`` closes once ``t + grace < L`` (its final value
    is produced); a bucket is deleted once every window holding it closed (``t + size +
    grace < L``)."""

    def __init__(self, size: Seconds, grace: Seconds = 0, merge: Optional[Merge] = None) -> None:
        self.size_ms = _ms(size)
        self.grace_ms = _ms(grace)
        if self.size_ms <= 0:
            raise ValueError("a sliding window's size must be positive")
        if self.grace_ms < 0:
            raise ValueError("grace must not be negative")
        self.layout = TimeKeyedLayout(merge)

    def __repr__(self) -> str:
        return f"<SlidingWindows size={self.size_ms}ms grace={self.grace_ms}ms>"

    def expiry_bound(self, latest_ms: int) -> None:
        """None: the generic window expiry does not apply (see :meth:`end_of_batch`)."""
        return None

    def late(self, ts_ms: int, latest_ms: Optional[int]) -> bool:
        return latest_ms is not None and ts_ms + self.grace_ms < latest_ms

    def _close_end(self, latest_ms: Optional[int]) -> int:
        return 0 if latest_ms is None else latest_ms - self.grace_ms

    def _delete_end(self, latest_ms: Optional[int]) -> int:
        return 0 if latest_ms is None else latest_ms - self.size_ms - self.grace_ms

    def window_value(self, task: TaskTables, table: "Table", kb: bytes, end: int) -> Any:
        """The merged buckets of ``kb`` in ``[end - size, end]`` (MISSING: none)."""
        layout = self.layout
        values = [layout.value(task, table, kb, s)
                  for s, _e in layout.intervals(task, table, kb) if end - self.size_ms <= s <= end]
        return layout.fold([v for v in values if v is not MISSING])

    def end_of_batch(self, task: TaskTables, table: "Table", before_ms: Optional[int],
                     latest_ms: Optional[int]) -> List["FinalRecord"]:
        """The final records of the windows that closed since the last batch end, in
        (end, key) order; then the deletion of the buckets no open window holds."""
        layout, closer = self.layout, table.closer
        finals: List["FinalRecord"] = []
        if closer is not None:
            for end, _start, kb in layout.due(task, table, self._close_end(before_ms),
                                              self._close_end(latest_ms)):
                value = self.window_value(task, table, kb, end)
                if value is MISSING:
                    continue
                finals.extend(closer.finals(table._decode_key(kb), end - self.size_ms, end,
                                            value))
                layout.rewrite(task, table, kb, end)
        for end, start, kb in layout.due(task, table, self._delete_end(before_ms),
                                         self._delete_end(latest_ms)):
            layout.delete(task, table, kb, start, end)
        return finals


class SlidingTable(WindowView):
    """A table of sliding windows: ``sw[k] += x`` (or ``.apply(fn)``, ``sw[k] = v``)
    updates the bucket of the current record's time (starting from ``default()``);
    ``sw[k].current()`` is the value of the window ending at the current record's time
    (the merge of its buckets); :meth:`on_close` sends each window's final value."""

    def __init__(self, table: "Table", window: SlidingWindows) -> None:
        super().__init__(table, window)

    def __repr__(self) -> str:
        return f"<SlidingTable {self.table.name} {self.window}>"

    def on_close(self, target: Any, sink: Any = ()) -> "SlidingTable":
        """As :meth:`SessionTable.on_close <shardworker.sessions.SessionTable.on_close>`:
        ``{"start": t - size, "end": t, "value": v}`` (seconds, both ends included)."""
        self._close_to(target, sink)
        return self

    def _update(self, key: Any, op: Callable[[Any], Any]) -> None:
        ctx, task = self._ctx()
        table, w = self.table, self.window
        ts = ctx.timestamp_ms
        assert ts is not None
        if self._dropped_as_late(ctx, task, w.late(ts, task.latest_ms)):
            return
        kb = table._key_bytes(key)
        stored = w.layout.intervals(task, table, kb)
        gone = [(ts, ts)] if (ts, ts) in stored else []
        old = w.layout.value(task, table, kb, ts) if gone else MISSING
        value = self._default() if old is MISSING else old
        w.layout.replace(task, table, ctx, key, kb, stored, gone, (ts, ts), op(value))

    def __getitem__(self, key: Any) -> "SlidingView":
        return SlidingView(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, SlidingView):
            return
        self._update(key, lambda _old: value)


class SlidingView(InPlaceOperators):
    """The sliding window of one key ending at the current record's time."""

    def __init__(self, stable: SlidingTable, key: Any) -> None:
        self.stable = stable
        self.key = key

    def current(self) -> Any:
        """The window ``[t - size, t]`` of the current record's time ``t``: the merge of
        the key's records in it (the default when none)."""
        st = self.stable
        ctx, task = st._ctx()
        value = st.window.window_value(task, st.table, st.table._key_bytes(self.key),
                                       ctx.timestamp_ms or 0)
        return st._default() if value is MISSING else value

    value = current

    def apply(self, fn: Callable[[Any], Any]) -> "SlidingView":
        """Sets the bucket of the current record's time to ``fn(bucket)``."""
        self.stable._update(self.key, fn)
        return self
