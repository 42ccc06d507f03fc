"""An agent test driver: run one agent over records you put, with no broker and no child
process (Faust's ``agent.test_context()``; DESIGN.md, "Testing agents")::

    async with count.test_context() as agent:
        event = await agent.put({"n": 1}, key="k", timestamp=60.0)
        assert counts["k"] == 1                 # the tables, as the agent left them
        assert agent.results == [...]           # what it yielded, in order
        assert agent.dead_letters == []         # what its error policy dead-lettered

What runs is the worker's own record path, not a copy of it: a
:class:`~shardworker.worker.Worker` (decode, forward, emit, the error policy, drain,
settle) with the agent started by the same runner the worker uses (an ``async def`` agent
on an event loop, a plain ``def`` one in a thread of its own), real tables over a fresh
LMDB store per task in a temporary directory, and the at-least-once committer.  Only the
edges are stand-ins: records come from :meth:`TestAgent.put` instead of a consumer, and
what would go to the broker is collected by a :class:`CollectingProducer` that
acknowledges everything at once.  Every put is one batch: its table writes are committed
to LMDB (and the changelog records "acknowledged") before it returns.

The worker runs in a thread of the driver's own (its event loop, when the agent is
async, is that thread's), so ``await agent.put(...)`` works inside a running event loop,
and ``with agent.test_context() as agent: agent.put(...)`` works without one.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple,
                    Union)

from confluent_kafka import KafkaError, KafkaException

from .agents import AgentRunner, AsyncAgentRunner, SyncAgentRunner
from .committers import AtLeastOnce
from .partitioner import partition_for
from .produce import message_max_bytes
from .state import TaskStates
from .store import TaskStore
from .stream import Event
from .tablecontext import CONTEXT
from .windowclose import LateRecordError
from .worker import Worker

if TYPE_CHECKING:  # pragma: no cover
    from .app import Agent, App, Topic

__all__ = ["AgentTestContext", "TestAgent", "SyncTestAgent", "Output", "Failure",
           "CollectingProducer"]

#: confluent_kafka's TIMESTAMP_CREATE_TIME: the producer set the record's timestamp
_CREATE_TIME = 1

Headers = Optional[Union[Dict[str, Union[str, bytes]], Sequence[Tuple[str, Union[str, bytes]]]]]


# -- what the driver hands back ----------------------------------------------------------
@dataclass
class Output:
    """A record the agent produced: to a sink (``agent.outputs``) or with ``topic.send``
    (``agent.sent``).  ``key`` and ``value`` are decoded with the topic's serializers (a
    topic the app does not declare: raw bytes)."""

    topic: str
    key: Any
    value: Any
    headers: Dict[str, bytes] = field(default_factory=dict)
    partition: Optional[int] = None


@dataclass
class Failure:
    """A record that could not be decoded or on which the agent raised.  Under
    ``on_error="dlq"`` it is in ``agent.dead_letters`` with the dead letter's
    ``headers`` (``shardsup.error``, ``shardsup.traceback``, ...); under ``"skip"`` in
    ``agent.skipped``.  ``key`` and ``value`` are the record's bytes, as the dead letter
    carries them; ``error`` is the exception itself."""

    topic: str
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]
    error: BaseException
    headers: Dict[str, bytes] = field(default_factory=dict)


# -- the edges: records in, records out -----------------------------------------------
class _Record:
    """A consumed (or delivered) record: the part of ``confluent_kafka.Message`` that the
    worker, the stream and the tables read."""

    __slots__ = ("_topic", "_partition", "_offset", "_key", "_value", "_headers", "_ts")

    def __init__(self, topic: str, partition: int, offset: int, key: Optional[bytes],
                 value: Optional[bytes], headers: Optional[List[Tuple[str, bytes]]],
                 timestamp_ms: int) -> None:
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._key = key
        self._value = value
        self._headers = headers
        self._ts = timestamp_ms

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> Optional[bytes]:
        return self._key

    def value(self) -> Optional[bytes]:
        return self._value

    def headers(self) -> Optional[List[Tuple[str, bytes]]]:
        return self._headers

    def timestamp(self) -> Tuple[int, int]:
        return _CREATE_TIME, self._ts

    def error(self) -> None:
        return None


@dataclass
class _Produced:
    topic: str
    partition: int
    key: Optional[bytes]
    value: Optional[bytes]
    headers: List[Tuple[str, bytes]]
    timestamp_ms: int
    on_delivery: Optional[Callable[[Any, Any], None]]


class CollectingProducer:
    """Stands in for the child's producer: keeps every record, refuses one larger than
    ``message.max.bytes`` as librdkafka does (so oversize outputs, table values and dead
    letters take the worker's own path), and acknowledges everything on ``flush``, with
    offsets counted per topic partition (changelog offsets come from those reports).

    ``partitions`` says how many partitions a topic has, for records produced without
    one (Java Kafka's partitioner on the key, as the app's producers use)."""

    def __init__(self, max_message_bytes: int, partitions: Callable[[str], int]) -> None:
        self.max_message_bytes = max_message_bytes
        self.partitions = partitions
        #: every record produced, in order (the driver takes them out as it sorts them)
        self.records: List[_Produced] = []
        self._unacked: List[_Produced] = []
        self._next_offset: Dict[Tuple[str, int], int] = {}

    def produce(self, topic: str, value: Optional[bytes] = None, key: Optional[bytes] = None,
                partition: int = -1, headers: Any = None,
                on_delivery: Optional[Callable[[Any, Any], None]] = None,
                timestamp: int = 0, **_config: Any) -> None:
        size = len(value or b"") + len(key or b"") + sum(
            len(v or b"") for _h, v in headers or ())
        if size > self.max_message_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        if partition < 0:
            partition = 0 if key is None else partition_for(key, self.partitions(topic))
        record = _Produced(topic, partition, key, value,
                           [(h, v if isinstance(v, bytes) else str(v).encode())
                            for h, v in headers or ()],
                           timestamp or int(time.time() * 1000), on_delivery)
        self.records.append(record)
        self._unacked.append(record)

    def flush(self, timeout: float = 0) -> int:
        """Acknowledges every record: its delivery report, with its offset."""
        unacked, self._unacked = self._unacked, []
        for record in unacked:
            tp = (record.topic, record.partition)
            offset = self._next_offset.get(tp, 0)
            self._next_offset[tp] = offset + 1
            if record.on_delivery is not None:
                record.on_delivery(None, _Record(record.topic, record.partition, offset,
                                                 record.key, record.value, record.headers,
                                                 record.timestamp_ms))
        return 0

    def poll(self, timeout: float = 0) -> int:
        return 0

    def __len__(self) -> int:
        return len(self._unacked)

    def take(self) -> List[_Produced]:
        """The records produced since the last take."""
        records, self.records = self.records, []
        return records


# -- the worker's parts that talk to Kafka, replaced -----------------------------------
class _LocalCommitter(AtLeastOnce):
    """The at-least-once committer on a :class:`CollectingProducer`, draining the tables
    after every chunk: each put is one batch, committed to LMDB before it returns."""

    drains_every_chunk = True

    def __init__(self, producer: CollectingProducer, delivery_errors: List[str],
                 state: TaskStates) -> None:
        # Committer's set-up only: AtLeastOnce's would make a Kafka producer
        super(AtLeastOnce, self).__init__(delivery_errors, lambda: None)
        self.on_record = state.on_record if state.enabled else None
        self.producer = producer  # type: ignore[assignment]


class _NoRestore:
    """A task's store starts empty: there is no changelog to restore it from."""

    restoring = False

    def bring_up_to_date(self, task: str, store: TaskStore, tables: Any, starts: Dict[Any, int],
                         cluster_id: str, should_stop: Any) -> Dict[Any, int]:
        return dict(starts)

    def close(self) -> None:
        pass


class _LocalStates(TaskStates):
    """The child's task states with no broker to ask: no cluster id, partition counts
    from the declarations, nothing to restore."""

    def __init__(self, app: "App", datadir: str, producer: CollectingProducer,
                 delivery_errors: List[str], partitions: Callable[[str], int]) -> None:
        super().__init__(app, datadir, {}, lambda task: producer,  # type: ignore[arg-type]
                         heartbeat=lambda: None, delivery_errors=delivery_errors)
        self.restorer = _NoRestore()  # type: ignore[assignment]
        self._cluster_id = ""
        for sub in self.topology.subtopologies:
            self._partitions[sub.index] = partitions(sub.leader)


class _DriverWorker(Worker):
    """The worker, fed by the driver, telling it what the agent yielded and what failed."""

    def __init__(self, app: "App", datadir: str, driver: "AgentTestContext") -> None:
        super().__init__(app, channel=None, bootstrap="", index=0,  # type: ignore[arg-type]
                         datadir=datadir)
        self.driver = driver

    def emit(self, agent: "Agent", msg: Any, value: Any) -> None:
        super().emit(agent, msg, value)
        self.driver.results.append(value)

    def on_agent_error(self, agent: "Agent", msg: Any, exc: BaseException) -> None:
        producer = self.driver.producer
        mark = len(producer.records)
        try:
            super().on_agent_error(agent, msg, exc)
        finally:
            if msg is not None:
                self.driver._failed(agent, msg, exc, producer.records[mark:])

    def report(self, force: bool) -> None:
        """No supervisor to report to."""


# -- the driver ------------------------------------------------------------------------
_ACTIVE = threading.Lock()


class AgentTestContext:
    """``agent.test_context()``: an (async) context manager that runs ``agent`` alone,
    over records put by the test, with fresh tables (see the module docstring).

    ``async with`` gives a :class:`TestAgent` (``await agent.put(...)``), ``with`` a
    :class:`SyncTestAgent` (``agent.put(...)``); both read the same results.  One test
    context runs at a time in a process (tables have one current record)."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.app = agent.app
        #: what the agent yielded, in order (the values themselves, one per ``yield``)
        self.results: List[Any] = []
        #: what the worker produced to the agent's sinks, in order, one per sink
        self.outputs: List[Output] = []
        #: what the agent sent with ``topic.send``/``send_soon``, in order
        self.sent: List[Output] = []
        #: records dead-lettered (``on_error="dlq"``), in order
        self.dead_letters: List[Failure] = []
        #: records dropped by ``on_error="skip"``, in order
        self.skipped: List[Failure] = []
        self.crashed: Optional[BaseException] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._datadir: Optional[str] = None
        self._offsets: Dict[Tuple[str, int], int] = {}
        self._last: Optional[Any] = None
        self._last_ms: Optional[int] = None
        self._saved: Tuple[Any, ...] = ()
        self._globals: List[Any] = []
        self.worker: Optional[_DriverWorker] = None

    # -- entering and leaving ------------------------------------------------------------
    def __enter__(self) -> "SyncTestAgent":
        self._start()
        return SyncTestAgent(self)

    def __exit__(self, *exc: Any) -> None:
        self._stop()

    async def __aenter__(self) -> "TestAgent":
        self._start()
        return TestAgent(self)

    async def __aexit__(self, *exc: Any) -> None:
        self._stop()

    def _start(self) -> None:
        if not _ACTIVE.acquire(blocking=False):
            raise RuntimeError("another agent test context is running in this process: "
                               "tables have one current record, so they run one at a time")
        try:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"test-{self.agent.name}")
            self._datadir = tempfile.mkdtemp(prefix=f"shardsup-test-{self.agent.name}-")
            self._call(self._setup)
        except BaseException:
            self._stop()
            raise

    def _stop(self) -> None:
        try:
            if self._executor is not None:
                self._call(self._teardown)
                self._executor.shutdown(wait=True)
        finally:
            self._executor = None
            if self._datadir is not None:
                shutil.rmtree(self._datadir, ignore_errors=True)
                self._datadir = None
            if _ACTIVE.locked():
                _ACTIVE.release()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._executor is not None, "the test context is not running"
        return self._executor.submit(fn, *args).result()

    def _submit(self, fn: Callable[..., Any], *args: Any) -> "concurrent.futures.Future[Any]":
        if self._executor is None:
            raise RuntimeError("the agent's test context is not running (use it inside "
                               "`async with agent.test_context() as agent:`)")
        return self._executor.submit(fn, *args)

    # -- in the driver's thread ----------------------------------------------------------
    def _setup(self) -> None:
        """The worker's set-up for this one agent (Worker.setup, minus Kafka)."""
        app, agent = self.app, self.agent
        assert self._datadir is not None
        limit = message_max_bytes(app.settings["kafka_config"])
        self.producer = CollectingProducer(limit, self._partitions)
        self.sends = CollectingProducer(limit, self._partitions)
        worker = self.worker = _DriverWorker(app, self._datadir, self)
        worker.max_message_bytes = limit
        worker.state = _LocalStates(app, self._datadir, self.producer,
                                    worker._delivery_errors, self._partitions)
        worker.committer = _LocalCommitter(self.producer, worker._delivery_errors, worker.state)
        self._saved = (app._producer, app._producer_errors, app._origin_header)
        app._producer, app._producer_errors = self.sends, None
        app._origin_header = worker.origin_header
        self._attach_global_tables()
        runner: AgentRunner
        if agent.is_async:
            worker.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(worker.loop)
            runner = AsyncAgentRunner(agent, worker.emit, worker.on_agent_error, worker.loop)
        else:
            runner = SyncAgentRunner(agent, worker.emit, worker.on_agent_error)
        on_record = worker.committer.on_record

        def seen(msg: Any) -> None:
            self._last = msg
            if on_record is not None:
                on_record(msg)
                self._last_ms = CONTEXT.timestamp_ms  # the event time, when extracted

        runner.stream.on_record = seen
        worker.runners.append(runner)  # stopped at exit even if it fails to start
        runner.start()
        if runner.fatal is not None:
            raise runner.fatal
        worker._route(runner)
        self._focus()

    def _teardown(self) -> None:
        CONTEXT.clear()
        worker = self.worker
        if worker is None:
            return
        try:
            for runner in worker.runners:
                runner.stop()
            if worker.loop is not None:
                worker.loop.close()
                asyncio.set_event_loop(None)
            if hasattr(worker, "state"):
                worker.state.close_all()
        finally:
            for table, store in self._globals:
                table.detach()
                table._store = store
            self._globals = []
            if self._saved:
                self.app._producer, self.app._producer_errors, self.app._origin_header = self._saved
            self.worker = None

    def _attach_global_tables(self) -> None:
        """Each global table reads an empty copy of its own (filled by ``set_global``)."""
        assert self._datadir is not None
        for table in self.app.global_tables:
            store = TaskStore(f"{self._datadir}/global/{table.name}", [table.name], sync=False)
            self._globals.append((table, table._store))
            table._store = store

    def _set_global(self, table: Any, key: Any, value: Any) -> None:
        if not any(t is table for t, _ in self._globals):
            raise ValueError(f"{table!r} is not a global table of app {self.app.id}")
        kb = table.topic.encode_key(key)
        raw = None if value is None else table.topic.encode_value(value)
        table._store.commit({table.name: {kb: raw}}, {}, {})

    def _partitions(self, topic: str) -> int:
        """Partitions of ``topic``: as declared (an internal topic: like its model),
        else one."""
        topics = self.app.topics
        declared = topics.get(topic)
        while declared is not None and declared.partitions is None and declared.like:
            declared = topics.get(declared.like)
        return (declared.partitions if declared is not None else None) or 1

    def _put(self, topic: "Topic", partition: int, key: Optional[bytes], value: Optional[bytes],
             timestamp: Optional[float], headers: Headers) -> Event:
        if self.crashed is not None:
            raise RuntimeError(f"agent {self.agent.name} stopped on an error "
                               f"({self.crashed!r}, policy crash): start a new test context")
        stamp = int(round((time.time() if timestamp is None else timestamp) * 1000))
        header_list = [(h, v if isinstance(v, bytes) else str(v).encode())
                       for h, v in (headers.items() if isinstance(headers, dict) else headers or ())]
        msg = self._record(topic.name, partition, key, value, header_list or None, stamp)
        batch = [msg]
        while batch:
            self._process(batch)
            batch = self._sort_produced()
        self._focus()
        return Event(_decoded(topic.decode_key, key), _decoded(topic.decode_value, value),
                     topic.name, partition, msg.offset(), stamp / 1000.0, dict(header_list))

    def _record(self, topic: str, partition: int, key: Optional[bytes], value: Optional[bytes],
                headers: Optional[List[Tuple[str, bytes]]], stamp: int) -> _Record:
        offset = self._offsets.get((topic, partition), 0)
        self._offsets[(topic, partition)] = offset + 1
        return _Record(topic, partition, offset, key, value, headers, stamp)

    def _process(self, batch: List[_Record]) -> None:
        """One batch through the worker: decode, agent, drain; then settle (the producer
        acknowledges at once, so the tables' changes commit to LMDB)."""
        worker = self.worker
        assert worker is not None
        for msg in batch:
            self._open_task(msg.topic(), msg.partition())
        try:
            worker.process_chunk(batch)  # type: ignore[arg-type]
        except BaseException as exc:
            self.crashed = exc
            raise
        worker.settle(block=True)

    def _open_task(self, topic: str, partition: int) -> None:
        worker = self.worker
        assert worker is not None
        task = worker.topology.task_id(topic, partition)
        state = worker.state
        if task not in state.tasks and state.enabled and state.holds_tables(task):
            state.open(task, {tp: 0 for tp in worker.topology.task_partitions(task)})

    def _sort_produced(self) -> List[_Record]:
        """Files what the batch produced (outputs, sends) and returns the records a
        re-keying agent forwarded: the next batch, read from the topic they went to."""
        agent = self.agent
        regroup = agent.regroup.topic if agent.regroup is not None else None
        changelogs = {t.changelog_topic for t in self.app.tables}
        forwarded: List[_Record] = []
        for rec in self.producer.take():
            if rec.topic == regroup:
                forwarded.append(self._record(rec.topic, rec.partition, rec.key, rec.value,
                                              rec.headers, rec.timestamp_ms))
            elif rec.topic not in changelogs and rec.topic != agent.dlq_topic:
                self.outputs.append(self._output(rec))
        self.sent.extend(self._output(rec) for rec in self.sends.take())
        return forwarded

    def _output(self, rec: _Produced) -> Output:
        topic = self.app.topics.get(rec.topic)
        key, value = rec.key, rec.value
        if topic is not None:
            key, value = _decoded(topic.decode_key, key), _decoded(topic.decode_value, value)
        return Output(rec.topic, key, value, dict(rec.headers), rec.partition)

    def _failed(self, agent: "Agent", msg: Any, exc: BaseException,
                produced: List[_Produced]) -> None:
        """Called by the worker's error policy for each failed record."""
        letters = [r for r in produced if r.topic == agent.dlq_topic]
        failure = Failure(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                          exc, dict(letters[-1].headers) if letters else {})
        if agent.on_error == "dlq" or isinstance(exc, LateRecordError):
            self.dead_letters.append(failure)
        elif agent.on_error == "skip":
            self.skipped.append(failure)

    def _focus(self) -> None:
        """Leaves the tables on the task of the last record the agent's loop took (before
        any: partition 0 of the loop's topic), so the test body reads them as the agent
        left them, and what it writes goes with the next batch."""
        worker = self.worker
        assert worker is not None
        last = self._last
        if last is not None:
            topic, partition, offset = last.topic(), last.partition(), last.offset()
            stamp: Optional[int] = self._last_ms or last.timestamp()[1]
        else:
            regroup = self.agent.regroup
            topic = regroup.topic if regroup is not None else self.agent.topic.name
            partition, offset, stamp = 0, -1, None
            self._open_task(topic, partition)
        task = worker.state.by_partition.get((topic, partition))
        if task is None:
            CONTEXT.clear()
            return
        CONTEXT.task = task
        CONTEXT.topic = topic
        CONTEXT.partition = partition
        CONTEXT.offset = offset
        CONTEXT.timestamp_ms = stamp
        CONTEXT.key = None  # writes of the test itself are not checked for their partition
        CONTEXT.writable = True


def _decoded(decode: Callable[[Optional[bytes]], Any], data: Optional[bytes]) -> Any:
    """``data`` decoded, or as it is when it does not decode (a bad record put on purpose)."""
    try:
        return decode(data)
    except Exception:  # noqa: BLE001 - the agent's decode fails on it the same way
        return data


class _TestAgentBase:
    """What both views of a running test context read."""

    def __init__(self, context: AgentTestContext) -> None:
        self.context = context

    @property
    def agent(self) -> "Agent":
        return self.context.agent

    @property
    def results(self) -> List[Any]:
        """What the agent yielded, in order: the values themselves, one per ``yield``
        (each went to every sink; see :attr:`outputs`)."""
        return self.context.results

    @property
    def outputs(self) -> List[Output]:
        """The records produced to the agent's sinks, in order, decoded."""
        return self.context.outputs

    @property
    def sent(self) -> List[Output]:
        """The records the agent sent with ``topic.send``/``send_soon``, in order."""
        return self.context.sent

    @property
    def dead_letters(self) -> List[Failure]:
        """Records dead-lettered by the agent's error policy (``on_error="dlq"``)."""
        return self.context.dead_letters

    @property
    def skipped(self) -> List[Failure]:
        """Records dropped by the agent's error policy (``on_error="skip"``)."""
        return self.context.skipped

    def _encode(self, value: Any, key: Any, topic: Any) -> Tuple["Topic", Optional[bytes],
                                                                  Optional[bytes]]:
        source = self._topic(topic)
        return source, source.encode_key(key), source.encode_value(value)

    def _topic(self, topic: Any) -> "Topic":
        agent = self.agent
        if topic is None:
            return agent.topic
        name = topic if isinstance(topic, str) else topic.name
        for candidate in agent.topics:
            if candidate.name == name:
                return candidate
        raise ValueError(f"agent {agent.name} does not read topic {name!r}")


class TestAgent(_TestAgentBase):
    """The running agent of ``async with agent.test_context() as agent``."""

    __test__ = False  # not a pytest test class

    async def put(self, value: Any = None, key: Any = None, *, partition: int = 0,
                  timestamp: Optional[float] = None, headers: Headers = None,
                  topic: Any = None) -> Event:
        """Runs the agent over one record of its topic (``topic=``: another topic it
        reads): ``key`` and ``value`` encoded with the topic's serializers (and decoded
        again by the worker, as in production), at ``partition`` (its task's tables),
        with ``timestamp`` (epoch seconds; default now: windows use it).  Returns when the
        record's outputs are collected and its table writes committed; raises what the
        agent raised under ``on_error="crash"``.  Returns the record as an
        :class:`~shardworker.stream.Event` (``key``, ``value``, ``offset``, ...)."""
        source, kb, vb = self._encode(value, key, topic)
        return await self.put_raw(vb, kb, partition=partition, timestamp=timestamp,
                                  headers=headers, topic=source)

    async def put_raw(self, value: Optional[bytes], key: Optional[bytes] = None, *,
                      partition: int = 0, timestamp: Optional[float] = None,
                      headers: Headers = None, topic: Any = None) -> Event:
        """:meth:`put` with the record's bytes as they are (a value the topic's
        serializer cannot decode, say)."""
        future = self.context._submit(self.context._put, self._topic(topic), partition, key,
                                      value, timestamp, headers)
        return await asyncio.wrap_future(future)

    async def set_global(self, table: Any, key: Any, value: Any) -> None:
        """Puts ``key``'s ``value`` (None deletes it) in a global table's copy, as if its
        topic had it (global tables start empty in a test context)."""
        await asyncio.wrap_future(self.context._submit(self.context._set_global, table, key,
                                                       value))


class SyncTestAgent(_TestAgentBase):
    """The running agent of ``with agent.test_context() as agent`` (no event loop)."""

    def put(self, value: Any = None, key: Any = None, *, partition: int = 0,
            timestamp: Optional[float] = None, headers: Headers = None,
            topic: Any = None) -> Event:
        """:meth:`TestAgent.put`, returning when the record is processed."""
        source, kb, vb = self._encode(value, key, topic)
        return self.put_raw(vb, kb, partition=partition, timestamp=timestamp, headers=headers,
                            topic=source)

    def put_raw(self, value: Optional[bytes], key: Optional[bytes] = None, *,
                partition: int = 0, timestamp: Optional[float] = None,
                headers: Headers = None, topic: Any = None) -> Event:
        """:meth:`TestAgent.put_raw`, returning when the record is processed."""
        return self.context._submit(self.context._put, self._topic(topic), partition, key,
                                    value, timestamp, headers).result()

    def set_global(self, table: Any, key: Any, value: Any) -> None:
        """:meth:`TestAgent.set_global`."""
        self.context._submit(self.context._set_global, table, key, value).result()
