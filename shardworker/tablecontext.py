"""The record being processed, as every table sees it: :class:`TableContext` (its task,
topic, partition, offset, timestamp and key, and whether its writes count) and the one
process-wide instance, :data:`CONTEXT`, that the worker sets per record.  Also what all
table modules share: :data:`MISSING` and the table errors.

The worker sets the context before it hands a record to an agent (via
:meth:`TableContext.set_message`) and clears it between batches; a table read or write
outside a record raises :class:`NoCurrentRecordError`.  Whether the record's writes count
is the task's skip rule (:meth:`TaskTables.observe
<shardworker.tasktables.TaskTables.observe>`).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional, Tuple

if TYPE_CHECKING:
    from .tasktables import TaskTables

__all__ = ["CONTEXT", "MISSING", "UNENCODED", "INT_BOUND", "TableContext", "TableError",
           "NoCurrentRecordError"]

#: "no such key" (and, from :meth:`TaskTables.read_raw`, "no Python value cached")
MISSING = object()

#: a write cache entry's serialized value not made yet: an int of 64 bits written to a
#: ``json`` table (it always encodes, and fits its changelog record) is encoded when it
#: leaves the cache (the drain, a raw read: ``BatchEnd.raw_of``), not at every write of a
#: hot key (:meth:`TaskTables.write <shardworker.tasktables.TaskTables.write>`)
UNENCODED = b"\x00unencoded"
#: such an int is in ``[-INT_BOUND, INT_BOUND)``
INT_BOUND = 1 << 63


class TableError(RuntimeError):
    """A table was used in a way that cannot work."""


class NoCurrentRecordError(TableError):
    """A table was used outside the processing of a record (no current task)."""


class TableContext:
    """What a table needs to know about the record being processed: its task's
    :class:`~shardworker.tasktables.TaskTables` and the record's topic, partition,
    offset and timestamp.

    The worker sets it for every record it hands to an agent (:meth:`set_record`); one
    agent runs at a time, so a single process-wide instance (:data:`CONTEXT`) serves
    async agents (event loop thread) and plain ones (their own thread) alike.
    """

    __slots__ = ("task", "topic", "partition", "source", "offset", "timestamp_ms", "writable",
                 "key")

    def __init__(self) -> None:
        self.task: Optional["TaskTables"] = None
        self.topic: Optional[str] = None
        self.partition = -1
        #: ``(topic, partition)``, made once per record for the writes that note it
        self.source: Tuple[Optional[str], int] = (None, -1)
        self.offset = -1
        self.timestamp_ms: Optional[int] = None
        #: the record's key as it came from Kafka (bytes), or None
        self.key: Optional[bytes] = None
        #: False when the record's effects are already in the stored state
        self.writable = False

    def set_record(self, task: "TaskTables", topic: str, partition: int, offset: int,
                   timestamp_ms: Optional[int] = None, key: Optional[bytes] = None) -> None:
        """Makes this record current.  ``timestamp_ms``: the record's timestamp (epoch
        ms; None or negative = unknown, then the wall clock is used for windows)."""
        if timestamp_ms is None or timestamp_ms < 0:
            timestamp_ms = int(time.time() * 1000)
        self.task = task
        self.topic = topic
        self.partition = partition
        self.source = source = (topic, partition)
        self.offset = offset
        self.timestamp_ms = timestamp_ms
        self.key = key
        self.writable = task.observe(source, offset, timestamp_ms)
        task.undo.clear()

    def set_message(self, task: "TaskTables", msg: Any, event_ms: Optional[int] = None,
                    source: Optional[Tuple[str, int]] = None) -> None:
        """:meth:`set_record` from a confluent_kafka ``Message`` (the same steps, inline:
        this runs for every record).  ``event_ms``: the record's event time when its
        topic extracts one from the value (``app.topic(..., timestamp=fn)``), else the
        Kafka timestamp is used.  ``source``: its ``(topic, partition)``, when the caller
        has made it already."""
        if event_ms is not None:
            stamp = event_ms
        else:
            kind, stamp = msg.timestamp()
            if not kind or stamp is None or stamp < 0:
                stamp = int(time.time() * 1000)
        if source is None:
            source = (msg.topic(), msg.partition())
        offset = msg.offset()
        self.task = task
        self.topic, self.partition = self.source = source
        self.offset = offset
        self.timestamp_ms = stamp
        self.key = msg.key()
        self.writable = task.observe(source, offset, stamp)
        task.undo.clear()

    def clear(self) -> None:
        """No current record (between batches)."""
        self.task = None
        self.topic = None
        self.source = (None, -1)
        self.writable = False

    def current_task(self) -> "TaskTables":
        task = self.task
        if task is None:
            raise NoCurrentRecordError(
                "tables can only be used while an agent processes a record (the table "
                "partition used is the one of that record's task)")
        return task


#: the process's context, set by the worker per record
CONTEXT = TableContext()
