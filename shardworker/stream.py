"""What an agent iterates: values, ``(key, value)`` pairs or whole events of its topic.

A stream hands out the records of the current batch from a buffer.  When the buffer is
empty the batch is done: the stream hands control back to the worker (which acknowledges
outputs and reports offsets) and resumes the agent when the next batch arrives.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import (TYPE_CHECKING, Any, Awaitable, Callable, Deque, Dict, List, Optional,
                    Protocol, Tuple, Union)

if TYPE_CHECKING:  # pragma: no cover
    from confluent_kafka import Message

    from .app import Agent


class RecordTables(Protocol):
    """What a queued record enters when its agent takes it: its task's
    :class:`~shardworker.tasktables.TaskTables`, or :data:`shardworker.state.NO_TABLES`."""

    def enter(self, msg: Any, source: Tuple[str, int], event_ms: Optional[int] = None) -> None:
        ...


#: a record queued for an agent by the worker: ``(value, record, (topic, partition),
#: tables, event_ms)``.  ``tables`` make the record their current one when the agent
#: takes it (None when the app has no tables); ``event_ms`` is the event time its topic
#: extracts from the value, else None (the record's timestamp)
QueuedRecord = Tuple[Any, "Message", Tuple[str, int], Optional[RecordTables], Optional[int]]


class Event:
    """One record as the agent sees it, with where it came from."""

    __slots__ = ("key", "value", "topic", "partition", "offset", "timestamp", "headers")

    def __init__(self, key: Any, value: Any, topic: str, partition: int, offset: int,
                 timestamp: Optional[float], headers: Dict[str, bytes]) -> None:
        self.key = key
        self.value = value
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp  # seconds since the epoch, as Faust gives it
        self.headers = headers

    def __repr__(self) -> str:
        return (f"<Event {self.topic}[{self.partition}]@{self.offset} key={self.key!r} "
                f"value={self.value!r}>")


class StreamStopped(Exception):
    """Raised inside the agent when the worker shuts down while the agent waits."""


class Stream:
    """The records of one agent's topic in this child, batch after batch."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.buffer: Deque[QueuedRecord] = deque()
        #: the record the agent is processing now (its key goes with what it yields)
        self.current: Optional["Message"] = None
        self._decode_key = agent.topic.decode_key
        #: a key that is not None: the codec's faster decoder when it has one (str:
        #: ``bytes.decode``, which refuses None with a TypeError), else ``_decode_key``
        self._decode_present_key = agent.topic.decode_present_key or self._decode_key
        #: an agent of several topics decodes each record's key with its own topic's codec
        self._key_decoders: Optional[Dict[str, Callable[[Any], Any]]] = (
            {t.name: t.decode_key for t in agent.topics} if len(agent.topics) > 1 else None)
        #: after ``group_by``/``through``: the topic the agent reads on from
        self.regrouped: Optional[str] = None
        #: ``group_by``'s key function (None for ``through``: the key stays)
        self.rekey: Optional[Callable[[Any], Any]] = None
        # installed by the agent runner: block (sync) or suspend (async) until more records
        self.wait_async: Optional[Callable[[], Awaitable[None]]] = None
        self.wait_sync: Optional[Callable[[], None]] = None
        # installed by the worker when its committer must see each record (exactly-once:
        # the record's transaction takes what the agent sends)
        self.on_record: Optional[Callable[["Message"], None]] = None
        # called at most twice a second while the agent works through a batch (the
        # child's report, which heartbeats once a second): the child's heartbeat must
        # not depend on how long a batch takes
        self.on_progress: Optional[Callable[[], None]] = None
        #: raised twice a second by the worker's ProgressTicker (no record reads the clock)
        self.progress_due = False

    # values
    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> Any:
        if not self.buffer:
            await self.wait_async()  # type: ignore[misc]
        return self._take()

    def _take(self) -> Any:
        """The next buffered record's value, its record made the one in hand
        (:attr:`current`, and its tables' current record): every iterator takes its
        records here, one plain call a record, no nested coroutine (``stream.items()``
        in an async agent has a copy inline)."""
        value, msg, source, tables, event_ms = self.buffer.popleft()
        self.current = msg
        if tables is not None:
            tables.enter(msg, source, event_ms)
        if self.on_record is not None:
            self.on_record(msg)
        if self.progress_due:
            self._progressed()
        return value

    def _progressed(self) -> None:
        """A tick since the last record: the flag goes down, ``on_progress`` runs."""
        self.progress_due = False
        if self.on_progress is not None:
            self.on_progress()

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Any:
        if not self.buffer:
            self.wait_sync()  # type: ignore[misc]
        return self._take()

    # re-keying
    def group_by(self, key: Union[Callable[[Any], Any], str], name: str,
                 partitions: Optional[int] = None, key_serializer: Optional[str] = None
                 ) -> "Stream":
        """Re-keys the stream by ``key`` (a function of the value, or a field name: a
        dict's key or a typed record's attribute):
        records go to the topic ``<app>-<name>-repartition`` and the agent's loop goes on
        with them on the tasks that own the new key's partition, so its table writes
        are local to the new key.  ``name`` (and ``partitions``, ``key_serializer``) must
        be literals: the topic is known before the app starts (:mod:`.graph`)."""
        self._regroup("group_by", name)
        self.rekey = key if callable(key) else (
            lambda value, field=key: value[field] if isinstance(value, dict) else getattr(value, field))
        return self

    def through(self, topic: Any) -> "Stream":
        """Sends the stream's records, keys unchanged, through ``topic`` (declared with
        ``app.topic``): the agent's loop goes on with them on the tasks of that topic."""
        self._regroup("through", topic if isinstance(topic, str) else topic.name)
        return self

    def _regroup(self, kind: str, name: str) -> None:
        regroup = self.agent.regroup
        found = regroup is not None and regroup.kind == kind and (
            regroup.name == name if kind == "group_by" else regroup.topic == name)
        if not found or self.regrouped is not None:
            raise RuntimeError(f"agent {self.agent.name}: {kind}({name!r}) is not the re-keying "
                               "found in its source when the app started (one per agent, "
                               "named with literals)")
        self.regrouped = regroup.topic
        topic = self.agent.app.topics[regroup.topic]
        self._decode_key = topic.decode_key
        self._decode_present_key = topic.decode_present_key or self._decode_key
        self._key_decoders = None

    # (key, value) pairs and events
    def items(self) -> "_Items":
        """Iterate ``(key, value)`` pairs, keys decoded with the topic's key serializer."""
        return _Items(self)

    def events(self) -> "_Events":
        """Iterate :class:`Event` objects: key, value, topic, partition, offset, ..."""
        return _Events(self)

    def current_event(self, value: Any) -> Event:
        """The record in hand as an :class:`Event` carrying ``value``."""
        msg = self.current
        assert msg is not None
        kind, stamp = msg.timestamp()
        headers = dict(msg.headers() or ())
        return Event(self._key_of(msg), value, msg.topic(), msg.partition(),
                     msg.offset(), stamp / 1000.0 if kind else None, headers)

    def current_key(self) -> Any:
        """The decoded key of the record in hand."""
        assert self.current is not None
        return self._key_of(self.current)

    def _key_of(self, msg: "Message") -> Any:
        if self._key_decoders is None:
            return self._decode_key(msg.key())
        return self._key_decoders[msg.topic()](msg.key())


class ProgressTicker:
    """Raises each stream's :attr:`Stream.progress_due` twice a second, from a thread of
    its own: an agent working through a long batch calls its stream's ``on_progress``
    (the child's report, which sends a heartbeat when one is due, once a second) at its
    next record, and no record reads the clock.  Ticking at half the heartbeat's
    interval keeps a long batch's heartbeats about a second apart, as the reports fall."""

    INTERVAL = 0.5

    def __init__(self, streams: List[Stream]) -> None:
        self.streams = streams
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardsup-progress",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread (at once: the wait between ticks wakes)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self.INTERVAL):
            for stream in self.streams:
                stream.progress_due = True


class _Items:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def __aiter__(self) -> "_Items":
        return self

    async def __anext__(self) -> Tuple[Any, Any]:
        stream = self.stream
        if not stream.buffer:
            await stream.wait_async()  # type: ignore[misc]
        # Stream._take, inline: an async agent's (key, value) loop is the common one
        value, msg, source, tables, event_ms = stream.buffer.popleft()
        stream.current = msg
        if tables is not None:
            tables.enter(msg, source, event_ms)
        if stream.on_record is not None:
            stream.on_record(msg)
        if stream.progress_due:
            stream._progressed()
        if stream._key_decoders is None:  # _key_of's common case, inline
            try:
                return stream._decode_present_key(msg.key()), value
            except TypeError:  # a None key, refused: the codec's own decoder
                if stream._decode_present_key is stream._decode_key:
                    raise  # it was the codec's own decoder already
                return stream._decode_key(msg.key()), value
        return stream._key_of(msg), value

    def __iter__(self) -> "_Items":
        return self

    def __next__(self) -> Tuple[Any, Any]:
        stream = self.stream
        if not stream.buffer:
            stream.wait_sync()  # type: ignore[misc]
        value = stream._take()
        msg = stream.current
        if stream._key_decoders is None:  # _key_of's common case, inline
            try:
                return stream._decode_present_key(msg.key()), value  # type: ignore[union-attr]
            except TypeError:  # a None key, refused: the codec's own decoder
                if stream._decode_present_key is stream._decode_key:
                    raise  # it was the codec's own decoder already
                return stream._decode_key(msg.key()), value  # type: ignore[union-attr]
        return stream._key_of(msg), value  # type: ignore[arg-type]


class _Events:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def __aiter__(self) -> "_Events":
        return self

    async def __anext__(self) -> Event:
        return self.stream.current_event(await self.stream.__anext__())

    def __iter__(self) -> "_Events":
        return self

    def __next__(self) -> Event:
        return self.stream.current_event(self.stream.__next__())


__all__: List[str] = ["Event", "ProgressTicker", "Stream", "StreamStopped"]
