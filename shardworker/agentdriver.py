"""What the agent test driver does in its own thread: it builds a
:class:`~shardworker.worker.Worker` for the one agent under test over Kafka's edges in
memory (:mod:`shardworker.localkafka`), and runs each record a test puts through it as
one batch, filing what the agent yielded, produced, sent and failed on as
:class:`Output` and :class:`Failure` records.

:class:`AgentDriver` is a part of :class:`~shardworker.testing.AgentTestContext` (which
inherits it and runs these methods on its thread), kept apart so that ``testing.py``
holds what a test calls.  Between puts it leaves :data:`~shardworker.tablecontext.CONTEXT`
on the last record's task, so the test body reads the tables as the agent left them.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .agents import AgentRunner, AsyncAgentRunner, SyncAgentRunner
from .localkafka import (CollectingProducer, Headers, LocalCommitter, LocalMessage,
                         LocalStates, Produced, header_bytes)
from .produce import message_max_bytes
from .store import TaskStore
from .stream import Event
from .tablecontext import CONTEXT
from .windowclose import LateRecordError
from .worker import Worker

if TYPE_CHECKING:  # pragma: no cover
    from .app import Agent, App, Topic

__all__ = ["AgentDriver", "DriverWorker", "Output", "Failure"]


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


# -- the worker, fed by the driver -------------------------------------------------------
class DriverWorker(Worker):
    """The worker, fed by the driver, telling it what the agent yielded and what failed."""

    def __init__(self, app: "App", datadir: str, driver: "AgentDriver") -> None:
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


# -- the driver --------------------------------------------------------------------------
class AgentDriver:
    """The driver's side of an agent test context, run in the driver's thread (see the
    module docstring): set-up and teardown of the worker, a put, and what it left."""

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
        #: the tables' directory, made and removed by the context around a run
        self._datadir: Optional[str] = None
        self._offsets: Dict[Tuple[str, int], int] = {}
        self._last: Optional[Any] = None
        self._last_ms: Optional[int] = None
        self._saved: Tuple[Any, ...] = ()
        self._globals: List[Any] = []
        self.worker: Optional[DriverWorker] = None

    def _setup(self) -> None:
        """The worker's set-up for this one agent (Worker.setup, minus Kafka)."""
        app, agent = self.app, self.agent
        assert self._datadir is not None
        limit = message_max_bytes(app.settings["kafka_config"])
        self.producer = CollectingProducer(limit, self._partitions)
        self.sends = CollectingProducer(limit, self._partitions)
        worker = self.worker = DriverWorker(app, self._datadir, self)
        worker.max_message_bytes = limit
        worker.state = LocalStates(app, self._datadir, self.producer,
                                   worker._delivery_errors, self._partitions)
        worker.committer = LocalCommitter(self.producer, worker._delivery_errors)
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
        has_tables = worker.state.enabled

        def seen(msg: Any) -> None:  # after the record's tables have entered it
            self._last = msg
            if has_tables:
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
        header_list = header_bytes(headers)
        msg = self._record(topic.name, partition, key, value, header_list or None, stamp)
        batch = [msg]
        while batch:
            self._process(batch)
            batch = self._sort_produced()
        self._focus()
        return Event(_decoded(topic.decode_key, key), _decoded(topic.decode_value, value),
                     topic.name, partition, msg.offset(), stamp / 1000.0, dict(header_list))

    def _record(self, topic: str, partition: int, key: Optional[bytes], value: Optional[bytes],
                headers: Optional[List[Tuple[str, bytes]]], stamp: int) -> LocalMessage:
        offset = self._offsets.get((topic, partition), 0)
        self._offsets[(topic, partition)] = offset + 1
        return LocalMessage(topic, partition, offset, key, value, headers, stamp)

    def _process(self, batch: List[LocalMessage]) -> None:
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

    def _sort_produced(self) -> List[LocalMessage]:
        """Files what the batch produced (outputs, sends) and returns the records a
        re-keying agent forwarded: the next batch, read from the topic they went to."""
        agent = self.agent
        regroup = agent.regroup.topic if agent.regroup is not None else None
        changelogs = {t.changelog_topic for t in self.app.tables}
        forwarded: List[LocalMessage] = []
        for rec in self.producer.take():
            if rec.topic == regroup:
                forwarded.append(self._record(rec.topic, rec.partition, rec.key, rec.value,
                                              rec.headers, rec.timestamp_ms))
            elif rec.topic not in changelogs and rec.topic != agent.dlq_topic:
                self.outputs.append(self._output(rec))
        self.sent.extend(self._output(rec) for rec in self.sends.take())
        return forwarded

    def _output(self, rec: Produced) -> Output:
        topic = self.app.topics.get(rec.topic)
        key, value = rec.key, rec.value
        if topic is not None:
            key, value = _decoded(topic.decode_key, key), _decoded(topic.decode_value, value)
        return Output(rec.topic, key, value, dict(rec.headers), rec.partition)

    def _failed(self, agent: "Agent", msg: Any, exc: BaseException,
                produced: List[Produced]) -> None:
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
        CONTEXT.source = (topic, partition)
        CONTEXT.offset = offset
        CONTEXT.timestamp_ms = stamp
        CONTEXT.record = None  # writes of the test itself are not checked for their partition
        CONTEXT.writable = True


def _decoded(decode: Callable[[Optional[bytes]], Any], data: Optional[bytes]) -> Any:
    """``data`` decoded, or as it is when it does not decode (a bad record put on purpose)."""
    try:
        return decode(data)
    except Exception:  # noqa: BLE001 - the agent's decode fails on it the same way
        return data
