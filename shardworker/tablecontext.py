"""The record being processed, as every table sees it: :class:`TableContext` (its task,
topic, partition, offset, timestamp and key, and whether its writes count) and the one
process-wide instance, :data:`CONTEXT`, that the worker sets per record.  Also what all
table modules share: :data:`MISSING` and the table errors.

The worker sets the context before it hands a record to an agent (the record's task does:
:meth:`TaskTables.enter <shardworker.tasktables.TaskTables.enter>`, which also applies the
skip rule that says whether the record's writes count) and clears it between batches; a
table read or write outside a record raises :class:`NoCurrentRecordError`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Tuple

if TYPE_CHECKING:
    from .tasktables import TaskTables

__all__ = ["CONTEXT", "MISSING", "UNENCODED", "INT_BOUND", "INT_BYTES", "SMALL_INT_MIN",
           "SMALL_INT_MAX", "TableContext", "TableError", "NoCurrentRecordError"]

#: "no such key" (and, from :meth:`TaskTables.read_raw`, "no Python value cached")
MISSING = object()

#: a write cache entry's serialized value not made yet: an int of 64 bits written to a
#: ``json`` table (it always encodes, and fits its changelog record) is encoded when it
#: leaves the cache (the drain, a raw read: ``BatchEnd.raw_of``), not at every write of a
#: hot key (:meth:`TaskTables.write <shardworker.tasktables.TaskTables.write>`)
UNENCODED = b"\x00unencoded"
#: such an int is in ``[-INT_BOUND, INT_BOUND)``, at most ``INT_BYTES`` encoded (a key
#: too long for its changelog record with them is encoded at the write, where a record
#: too large fails alone)
INT_BOUND = 1 << 63
INT_BYTES = len(b"%d" % -INT_BOUND)
#: the ints ``Table.__setitem__`` defers itself, ``[SMALL_INT_MIN, SMALL_INT_MAX]``:
#: those CPython compares in one step (one internal digit; the bounds named, not negated
#: at every write); a larger one takes ``TaskTables.write``, which defers it too when it
#: is within :data:`INT_BOUND`
SMALL_INT_MAX = (1 << 30) - 1
SMALL_INT_MIN = -SMALL_INT_MAX


class TableError(RuntimeError):
    """A table was used in a way that cannot work."""


class NoCurrentRecordError(TableError):
    """A table was used outside the processing of a record (no current task)."""


class TableContext:
    """What a table needs to know about the record being processed: its task's
    :class:`~shardworker.tasktables.TaskTables` and the record's topic, partition,
    offset and timestamp.

    The worker sets it for every record it hands to an agent (through the record's task,
    ``TaskTables.enter``; :meth:`set_record` and :meth:`set_message` do the same); one
    agent runs at a time, so a single process-wide instance (:data:`CONTEXT`) serves
    async agents (event loop thread) and plain ones (their own thread) alike.
    """

    __slots__ = ("task", "source", "offset", "timestamp_ms", "writable", "record")

    def __init__(self) -> None:
        self.task: Optional["TaskTables"] = None
        #: ``(topic, partition)``, made once per record for the writes that note it
        self.source: Tuple[Optional[str], int] = (None, -1)
        self.offset = -1
        self.timestamp_ms: Optional[int] = None
        #: False when the record's effects are already in the stored state
        self.writable = False
        #: the record itself (what has a ``confluent_kafka.Message``'s methods), or None
        self.record: Any = None

    @property
    def topic(self) -> Optional[str]:
        """The record's topic (of :attr:`source`), or None."""
        return self.source[0]

    @property
    def partition(self) -> int:
        """The record's partition (of :attr:`source`), or -1."""
        return self.source[1]

    @property
    def key(self) -> Optional[bytes]:
        """The record's key as it came from Kafka (bytes), or None."""
        record = self.record
        return None if record is None else record.key()  # type: ignore[no-any-return]

    def set_record(self, task: "TaskTables", topic: str, partition: int, offset: int,
                   timestamp_ms: Optional[int] = None, key: Optional[bytes] = None) -> None:
        """Makes this record current.  ``timestamp_ms``: the record's timestamp (epoch
        ms; None or negative = unknown, then the wall clock is used for windows)."""
        source = (topic, partition)
        task.enter(RecordParts(topic, partition, offset, timestamp_ms, key), source, None, self)
        task.note_offset(source, offset)

    def set_message(self, task: "TaskTables", msg: Any, event_ms: Optional[int] = None,
                    source: Optional[Tuple[str, int]] = None) -> None:
        """:meth:`set_record` from a confluent_kafka ``Message``.  ``event_ms``: the
        record's event time when its topic extracts one from the value
        (``app.topic(..., timestamp=fn)``), else the Kafka timestamp is used.  ``source``:
        its ``(topic, partition)``, when the caller has made it already.  The worker
        calls :meth:`TaskTables.enter <shardworker.tasktables.TaskTables.enter>` itself
        (and passes the offsets at the drain)."""
        source = source or (msg.topic(), msg.partition())
        task.enter(msg, source, event_ms, self)
        task.note_offset(source, msg.offset())

    def clear(self) -> None:
        """No current record (between batches)."""
        self.task = None
        self.source = (None, -1)
        self.writable = False
        self.record = None

    def current_task(self) -> "TaskTables":
        task = self.task
        if task is None:
            raise NoCurrentRecordError(
                "tables can only be used while an agent processes a record (the table "
                "partition used is the one of that record's task)")
        return task


class RecordParts:
    """A record given by its parts, with the methods of a ``confluent_kafka.Message``
    that :meth:`TaskTables.enter <shardworker.tasktables.TaskTables.enter>` reads (the
    test driver's records, :class:`~shardworker.localkafka.LocalMessage`, are these
    and more).  ``timestamp()``: (1, ms) as confluent_kafka's create time, or (0, -1)
    when unknown."""

    __slots__ = ("_topic", "_partition", "_offset", "_timestamp_ms", "_key")

    def __init__(self, topic: str, partition: int, offset: int,
                 timestamp_ms: Optional[int] = None, key: Optional[bytes] = None) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._timestamp_ms, self._key = timestamp_ms, key

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> Tuple[int, int]:
        return (0, -1) if self._timestamp_ms is None else (1, self._timestamp_ms)

    def key(self) -> Optional[bytes]:
        return self._key


#: the process's context, set by the worker per record
CONTEXT = TableContext()
