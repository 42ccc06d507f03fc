"""What happens when a window closes, and to the records that come too late for it.

* :class:`WindowCloser`: ``table.tumbling(...).on_close(sink)`` (or ``on_close(fn,
  sink=...)``) turns each window that closes into final records for a sink topic: key =
  the table key, value = ``{"start": s, "end": e, "value": v}`` (seconds since the
  epoch, end exclusive).  The task's tables call it at the end of a batch
  (:meth:`TaskTables.drain <shardworker.batchend.BatchEnd.drain>`) and the records
  are produced with the batch's changelog records, on the task's producer (exactly-once:
  in its transaction).
* :class:`LateRecordError`: raised by a write to a closed window of a table declared
  with ``on_late="dlq"``; the worker dead-letters the record whatever the agent's error
  policy (DESIGN.md, "Windows and time").
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

from .tablecontext import TableError

__all__ = ["WindowCloser", "FinalRecord", "LateRecordError", "LATE_POLICIES"]

log = logging.getLogger("shardworker.tables")

#: what a table does with a record for a closed window: drop it (counted), or also
#: dead-letter it
LATE_POLICIES = ("drop", "dlq")

#: ``fn(key, (start, end), value)``: may return or yield values for the closer's sinks
CloseCallback = Callable[[Any, Tuple[float, float], Any], Any]


class LateRecordError(TableError):
    """A record wrote to a window that is closed (its end + grace is past the task's
    stream time) in a table with ``on_late="dlq"``."""


class FinalRecord(NamedTuple):
    """One record a closing window produces (serialized)."""

    topic: str
    key: Optional[bytes]
    value: Optional[bytes]


class WindowCloser:
    """The ``on_close`` of a windowed table: a sink topic (the final value of each
    closed window goes to it), or a callback ``fn(key, window, value)`` whose returned
    or yielded values go to ``sinks`` (none: the callback's side effects only)."""

    def __init__(self, target: Any, sinks: Sequence[Any] = ()) -> None:
        if _is_topic(target):
            self.callback: Optional[CloseCallback] = None
            self.sinks: List[Any] = [target, *sinks]
        elif callable(target):
            if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
                raise TypeError("on_close callbacks are plain functions (they run while the "
                                "batch ends, outside any event loop)")
            self.callback = target
            self.sinks = list(sinks)
        else:
            raise TypeError(f"on_close takes a topic or a function, not {target!r}")
        for sink in self.sinks:
            if not _is_topic(sink):
                raise TypeError(f"on_close sink {sink!r} is not a topic (app.topic(...))")

    def __repr__(self) -> str:
        what = getattr(self.callback, "__name__", "sink")
        return f"<WindowCloser {what} -> {[s.name for s in self.sinks]}>"

    def finals(self, key: Any, start_ms: int, end_ms: int, value: Any) -> List[FinalRecord]:
        """The records for the window ``[start_ms, end_ms)`` of ``key``, closed with
        ``value``.  A callback that raises is logged and the window's records skipped:
        a batch end must not fail again and again on a user function."""
        window = (start_ms / 1000.0, end_ms / 1000.0)
        try:
            if self.callback is None:
                values: List[Any] = [{"start": window[0], "end": window[1], "value": value}]
            else:
                out = self.callback(key, window, value)
                values = [] if out is None else (
                    list(out) if inspect.isgenerator(out) or isinstance(out, (list, tuple))
                    else [out])
            records = []
            for sink in self.sinks:
                kb = sink.encode_key(key)
                for value_out in values:
                    records.append(FinalRecord(sink.name, kb, sink.encode_value(value_out)))
            return records
        except Exception:  # noqa: BLE001 - logged; the batch goes on
            log.exception("on_close of key %r, window %s failed: no final record", key, window)
            return []


def _is_topic(obj: Any) -> bool:
    return hasattr(obj, "encode_value") and hasattr(obj, "encode_key") and hasattr(obj, "name")


CloseTarget = Union[Any, CloseCallback]
