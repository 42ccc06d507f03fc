"""The child process's runtime: the whole data path of a record, top to bottom.

    1 consume → 2 decode → 3 agents (outputs, dead letters, table writes)
      → the tables' changelog records → 4 the broker holds it all (the committer)
      → 5 LMDB commit (state + offsets) → 6 report offsets to the supervisor

A child reads its partitions with ``assign()`` (it is not a group member).
:meth:`Worker.run` is the loop; :meth:`Worker.process` and :meth:`Worker.process_chunk`
are steps 1-3 of a batch, :meth:`Worker.settle` steps 4-6.  Step 4 is the processing
guarantee, a strategy object (:mod:`.committers`): at least once, every record the batch
produced is acknowledged; exactly-once, each task's outputs, changelog records and input
offsets commit as one Kafka transaction.  Batches overlap: the next is processed while
the broker acknowledges the last; they settle in order.  A crash anywhere before step 6
means the batch is read again, and no state is applied twice (docs/architecture.md,
"A record's path").
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections import Counter as tally
from collections import deque
from itertools import repeat
from typing import Any, Deque, Dict, List, Optional, Tuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from .agents import AgentRunner, AsyncAgentRunner, SyncAgentRunner
from .app import Agent, App
from .codecs import CodecUnavailable
from .committers import Committer, Processed, make_committer
from .crontab import ScheduledJobs
from .globaltables import CatchUpGate
from .metrics import own_metrics
from .deadletters import dead_letter, log_failure
from .produce import (DEFAULT_MESSAGE_MAX_BYTES, RecordTooLarge, is_too_large, message_max_bytes,
                      produce)
from .protocol import Bye, Channel, ChannelClosed, Ready
from .protocol import Message as ChannelMessage
from .state import TaskStates
from .stream import ProgressTicker
from .supervisorlink import SupervisorLink
from .timers import TimerRunner
from .origins import OriginStamper, origin_of
from .topology import TopicPartitionKey, sources_of
from .windowclose import LateRecordError

log = logging.getLogger("shardworker.worker")

#: at least once, the tables' changes are drained before this many keys are dirty, even
#: when the interval (``commit_interval``) is not over: bounds memory and changelog bursts
MAX_DIRTY_KEYS = 20_000
#: seconds one poll waits for records; with table changes not drained yet (:meth:`Worker.poll`)
POLL_WAIT = 0.1
CAUGHT_UP_WAIT = 0.02


class Route:
    """What a source topic's records meet in this child: its value decoder, the agents
    that take them (their streams' buffers) and the agents that forward them."""

    __slots__ = ("decode", "decode_all", "event_time", "runners", "buffers", "forwards",
                 "at_once")

    def __init__(self, topic: Any) -> None:
        self.decode = topic.decode_value
        #: the codec's ``loads_many``, or None
        self.decode_all = topic.decode_values
        #: the topic's event time from the value (``timestamp=fn``), or None
        self.event_time = topic.event_time_ms if topic.timestamp is not None else None
        self.runners: List[AgentRunner] = []
        #: the runners' stream buffers, where a record is queued for them
        self.buffers: Tuple[Any, ...] = ()
        self.forwards: List[AgentRunner] = []
        #: a chunk of the topic may be queued at once (Worker._queue_at_once): its values
        #: decode at once, and no record needs a look of its own (event time, forwarding)
        self.at_once = False


class Worker(SupervisorLink, TimerRunner):
    """Runs the app's agents over the partitions the supervisor assigns to this child."""

    def __init__(self, app: App, channel: Channel, bootstrap: str, index: int,
                 datadir: str = ".") -> None:
        self.app = app
        self.datadir = datadir
        self.channel = channel
        self.bootstrap = bootstrap
        self.index = index
        self.topology = app.topology
        #: topics the app reads: what it sends to them carries its origin (.origins)
        self.self_fed = frozenset(self.topology.source_topics)
        #: of those, the topics of tasks with tables: where origins are looked for
        self.deduplicated = frozenset(t for sub in self.topology.subtopologies if sub.tables
                                      for t in sub.sources)
        self.stamper = OriginStamper()
        #: the agent running now (step 2), whose record in hand is what it sends' origin
        self.current: Optional[AgentRunner] = None
        #: raises the streams' progress flags twice a second (set up with the runners)
        self.ticker: Optional[ProgressTicker] = None
        self.batch_size = int(app.settings["batch_size"])
        self.stopping = False
        self.tasks: List[str] = []
        #: next offset to read, per partition, for records whose effects are acknowledged
        self.positions: Dict[TopicPartitionKey, int] = {}
        self._reported: Dict[TopicPartitionKey, int] = {}
        self._last_report = 0.0
        self._last_stats = 0.0
        self.processed = 0
        self.errors = 0
        self._delivery_errors: List[str] = []
        #: the producers' ``message.max.bytes``: a dead letter is truncated to fit it
        self.max_message_bytes = DEFAULT_MESSAGE_MAX_BYTES
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.runners: List[AgentRunner] = []
        #: the supervisor's messages received and not acted on yet (see handle_control)
        self.control: Deque[ChannelMessage] = deque()
        #: per source topic: the agents its records go to, and those that forward them
        #: (re-keyed by ``group_by`` or ``through``) to the topic the agent reads on from
        self.routes: Dict[str, Route] = {}
        self._timer_due: Dict[str, float] = {}
        #: ``@app.crontab`` jobs and ``@app.task`` functions, run with the timers
        self.jobs = ScheduledJobs(app.crontabs, app.startup_tasks)
        #: batches processed that the broker may not hold yet (step 4 pending), in order
        self.unsettled: List[Processed] = []
        #: next offsets of records processed whose table changes are not drained yet
        self.undrained: Dict[TopicPartitionKey, int] = {}
        self._last_drain = 0.0
        #: seconds between drains of the tables' changes, at least once (exactly-once
        #: drains every chunk: a transaction holds exactly its records' effects)
        self.drain_interval = float(app.settings["commit_interval"])
        #: no record before every global table's copy caught up (DESIGN.md, "Global tables")
        self.global_tables = CatchUpGate(app.global_tables, datadir, app.id)
        #: shardsup's own per-partition counters, sent with the app's metrics in each
        #: heartbeat (DESIGN.md, "Metrics")
        self.own_metrics = own_metrics()
        counters: Dict[str, Any] = self.own_metrics.metrics
        self.processed_by = counters["shardsup_records_processed"]
        self.dead_lettered_by = counters["shardsup_records_dead_lettered"]
        self.skipped_by = counters["shardsup_records_skipped"]
        self.restored_by = counters["shardsup_records_restored"]
        self.late_by = counters["shardsup_late_records"]
        #: late records per (task, table) already counted (state.late_counts only grows)
        self._late_seen: Dict[Tuple[str, str], int] = {}

    # -- set-up ---------------------------------------------------------------------
    def setup(self) -> None:
        """Creates this process's Kafka clients and starts its agents (after exec)."""
        app = self.app
        consumer_config = {
            **app.consumer_config(self.bootstrap),
            "group.id": app.id,               # for offset look-ups only: never subscribes
            "client.id": f"{app.id}-child-{self.index}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": app.settings["auto_offset_reset"],
            "fetch.wait.max.ms": 100,
            # aborted transactions' records are skipped (librdkafka's default, said aloud)
            "isolation.level": "read_committed",
        }
        self.consumer = Consumer(consumer_config)
        self.max_message_bytes = message_max_bytes(app.producer_config(self.bootstrap))
        self.state = TaskStates(app, self.datadir, consumer_config,
                                lambda task: self.committer.producer_for_task(task),
                                heartbeat=self.heartbeat, delivery_errors=self._delivery_errors)
        #: the processing guarantee: which producers, and when a batch is done (step 4)
        self.committer: Committer = make_committer(
            app, self.bootstrap, f"{app.id}-child-{self.index}", self._delivery_errors,
            self.heartbeat, self.consumer, self.state, self.positions)
        if any(agent.is_async for agent in app.agents) or any(
                asyncio.iscoroutinefunction(t.fn) for t in app.timers) or self.jobs.needs_loop:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        for agent in app.agents:
            runner: AgentRunner
            if agent.is_async:
                assert self.loop is not None
                runner = AsyncAgentRunner(agent, self.emit, self.on_agent_error, self.loop)
            else:
                runner = SyncAgentRunner(agent, self.emit, self.on_agent_error)
            runner.stream.on_record = self.committer.on_record
            runner.stream.on_progress = lambda: self.report(force=False)
            runner.start()
            self.runners.append(runner)
            self._route(runner)
        self.ticker = ProgressTicker([runner.stream for runner in self.runners])
        self.ticker.start()
        app._origin_header = self.origin_header
        signal.signal(signal.SIGTERM, self._on_term)

    def _route(self, runner: AgentRunner) -> None:
        """Where the records of each topic go: to the agent's stream, or (a re-keying
        agent's source topics) to :meth:`forward`.  A re-keying agent has called
        ``group_by``/``through`` by now: starting it ran it up to its first record."""
        topics = self.app.topics
        regroup = runner.agent.regroup
        if regroup is not None and runner.stream.regrouped is None:
            raise RuntimeError(f"agent {runner.agent.name}: {regroup.kind}() must be called on "
                               "the stream before the agent's loop takes its first record")
        for topic in runner.agent.topics:
            route = self.routes.setdefault(topic.name, Route(topics[topic.name]))
            (route.forwards if regroup is not None else route.runners).append(runner)
        if regroup is not None:
            route = self.routes.setdefault(regroup.topic, Route(topics[regroup.topic]))
            route.runners.append(runner)
        for route in self.routes.values():
            route.buffers = tuple(r.stream.buffer for r in route.runners)
            route.at_once = (route.decode_all is not None and route.event_time is None
                             and not route.forwards)

    def heartbeat(self) -> None:
        """Tells the supervisor this child is alive while it waits for the broker (the
        throttled :meth:`report`)."""
        self.report(force=False)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    # -- the loop -------------------------------------------------------------------
    def run(self) -> int:
        """Processes batches until told to stop; returns the process's exit code."""
        self.setup()
        self.channel.send(Ready(os.getpid()))
        try:
            while not self.stopping:
                self.handle_control(timeout=0)
                if not self.global_tables.wait(0.1):
                    self.report(force=False)  # the heartbeat while the copies catch up
                    continue
                records = self.poll()
                if records:
                    self.process(records)
                elif not self.positions:
                    self.handle_control(timeout=0.1)  # nothing assigned: wait for work
                self.settle(block=False, caught_up=not records)
                self.run_timers()
                self.report(force=False)
            self.settle(block=True)
            self.report(force=True)
            self.channel.send(Bye(self._offsets_list(self.positions)))
            return 0
        except ChannelClosed:
            log.error("the supervisor has gone; exiting without committing")
            return 1
        finally:
            self.close()

    def poll(self) -> Optional[List[Message]]:
        """Step 1: the next records of the assigned partitions (None: none assigned).  With
        table changes not drained yet the wait is short, so a child that has caught up
        drains them (and reports its offsets) within :data:`CAUGHT_UP_WAIT` of its last
        record; a busy child finds a full batch waiting either way."""
        if not self.positions:
            return None
        return self.consumer.consume(self.batch_size,
                                     CAUGHT_UP_WAIT if self.undrained else POLL_WAIT)

    def process(self, records: List[Message]) -> None:
        """Steps 1-3 of a batch, in the chunks the committer asks for (exactly-once: sized
        so no transaction outlives its timeout), with a chance to settle after each."""
        for chunk in self.committer.chunks(records):
            self.process_chunk(chunk)
            self.settle(block=False)

    def process_chunk(self, records: List[Message]) -> None:
        """Steps 1-3 for ``records``: decode, run the agents, drain the tables' changes
        when due (:meth:`drain`)."""
        consumed = len(records)
        self.stamper.forget()  # a record's sends are all made within its chunk
        if records and any(map(type(records[0]).error, records)):
            for msg in records:
                if msg.error() is not None:
                    self.on_consume_error(msg)
            records = [msg for msg in records if msg.error() is None]
        sources = sources_of(records)
        # each partition's last record, in C (zip/dict), not per record in Python
        ends = dict(zip(sources, records))
        # 1. decode each record and queue it for the agents of its topic, with the tables
        #    it enters when an agent takes it
        if not self._queue_at_once(records, sources, ends):
            self._queue_each(records, sources)
        # 2. the agents process their share (what they yield is produced to their sinks)
        for runner in self.runners:
            if runner.stream.buffer:
                self.current = runner
                runner.drain()
                self.current = None
            if runner.fatal is not None:
                raise runner.fatal
        self.processed += consumed  # stats count processing; offsets wait for acks
        # per partition: the next offset to read (after its last record: a partition's
        # records come in offset order) and the count (Counter: in C)
        for tp, last in ends.items():
            self.undrained[tp] = last.offset() + 1
        for (topic, part), count in tally(sources).items():
            self.processed_by._inc((topic, str(part)), count)
        # 3. the tables' changes: one changelog record per key changed since the last drain
        if self._drain_due():
            self.drain()

    def _queue_at_once(self, records: List[Message], sources: List[TopicPartitionKey],
                       ends: Dict[TopicPartitionKey, Message]) -> bool:
        """Step 1 for the common chunk, in C (map/zip) rather than per record in Python
        (what is checked in Python is checked once per partition):
        records of one topic whose route takes them at once (:attr:`Route.at_once`:
        nothing of :meth:`_queue_each`'s to do per record), none of them with origin
        headers to check or a tombstone, their values decoded by the codec's
        ``loads_many``.  False, having queued nothing, for any other chunk: then
        :meth:`_queue_each`, where each failure is its record's own.  ``ends``: the
        chunk's partitions (each with its last record)."""
        if not records:
            return True
        topic = sources[0][0]
        if len(ends) > 1 and len({tp[0] for tp in ends}) > 1:
            return False
        route = self.routes.get(topic)
        if route is None:
            return True  # no agent reads the topic here
        kind = type(records[0])
        if not route.at_once or (topic in self.deduplicated and any(map(kind.headers, records))):
            return False
        payloads = list(map(kind.value, records))
        if None in payloads:
            return False
        try:
            values = list(route.decode_all(payloads))  # type: ignore[misc]
        except CodecUnavailable:
            raise  # not the records' fault: the child stops (on_agent_error)
        except Exception:  # noqa: BLE001 - one by one, each failure the record's own
            return False
        if len(values) != len(records):
            return False
        queued = zip(values, records, sources, self.state.tables_for(sources), repeat(None))
        if len(route.buffers) == 1:
            route.buffers[0].extend(queued)
        else:
            items = list(queued)
            for buffer in route.buffers:
                buffer.extend(items)
        return True

    def _queue_each(self, records: List[Message], sources: List[TopicPartitionKey]) -> None:
        """Step 1 one record at a time: a record the app sent itself and this task
        applied already is skipped (:mod:`.origins`); a value that cannot be decoded, or
        whose event time cannot be extracted, fails its record alone; re-keying agents
        forward the record to the topic they read on from.  (What it does per record
        decides :attr:`Route.at_once`: :meth:`_queue_at_once` does none of it.)"""
        routes = self.routes
        deduplicated = self.deduplicated
        for msg, source, tables in zip(records, sources, self.state.tables_for(sources)):
            topic = source[0]
            route = routes.get(topic)
            if route is None:
                continue
            if topic in deduplicated:  # a record without headers (from outside): one call
                headers = msg.headers()
                if headers is not None and self.applied_before(msg, headers):
                    continue
            event_ms = None
            try:
                value = route.decode(msg.value())
                if route.event_time is not None:  # DESIGN.md, "Windows and time"
                    event_ms = route.event_time(value)
            except Exception as exc:  # noqa: BLE001 - a bad record, not a bad worker
                for runner in route.runners + route.forwards:
                    self.on_agent_error(runner.agent, msg, exc)
                continue
            item = (value, msg, source, tables, event_ms)
            for buffer in route.buffers:
                buffer.append(item)
            if route.forwards:
                for runner in route.forwards:
                    self.forward(runner, msg, value, event_ms)

    def _drain_due(self) -> bool:
        """Every chunk without tables or under exactly-once; at least once with tables,
        every :attr:`drain_interval` or at :data:`MAX_DIRTY_KEYS`: a key that many records
        change in the interval costs one changelog record and one LMDB write, as with
        Kafka Streams' record cache (DESIGN.md, "State (LMDB)")."""
        if not self.state.enabled or self.committer.drains_every_chunk:
            return True
        return (time.monotonic() - self._last_drain >= self.drain_interval
                or self.state.dirty_keys() >= MAX_DIRTY_KEYS)

    def drain(self) -> None:
        """Step 3: the records processed since the last drain become one processed batch
        (their tables' changes produced to the changelogs), which :meth:`settle` commits."""
        if not self.undrained:
            return
        positions, self.undrained = self.undrained, {}
        changes = self.state.drain(positions) if self.state.enabled else []
        self._last_drain = time.monotonic()
        self.unsettled.append((self._last_drain, positions, changes))

    def settle(self, block: bool, caught_up: bool = False) -> None:
        """Steps 4-6 for every processed batch the broker now holds, in batch order.
        What is processed and not drained yet is drained first when ``block``, when due,
        or when the child has ``caught_up`` (its last poll waited and found nothing): the
        end of a burst is durable and reported at once, not a ``commit_interval`` later,
        and an idle child has nothing better to do."""
        if self.undrained and (block or caught_up or self._drain_due()):
            self.drain()
        # 4. the committer: acknowledged (at least once) or committed (exactly-once)
        for positions, changes in self.committer.settle(self.unsettled, block):
            # 5. the tables' state and offsets commit to LMDB, per task in one transaction
            self.state.commit(changes)
            # 6. the offsets count as processed (reported to the supervisor)
            self.positions.update(positions)

    def applied_before(self, msg: Message, headers: List[Tuple[str, bytes]]) -> bool:
        """True when ``msg`` (with ``headers``) came from this app and its task applied
        its origin already (an upstream batch processed again: :mod:`.origins`).  Tasks
        with tables keep their origins with their state; others keep none."""
        tables = self.state.by_partition.get((msg.topic(), msg.partition()))
        if tables is None:
            return False
        origin = origin_of(headers)
        return origin is not None and not tables.origins.admit(*origin)

    def origin_header(self, topic: str) -> Optional[Tuple[str, bytes]]:
        """The origin header of a record an agent sends to ``topic`` with
        ``topic.send()`` (None: not a topic the app reads, or not sent by an agent)."""
        runner = self.current
        if topic not in self.self_fed or runner is None or runner.stream.current is None:
            return None
        msg = runner.stream.current
        return self.stamper.header(runner.agent.name, msg.topic(), msg.partition(), msg.offset())

    def forward(self, runner: AgentRunner, msg: Message, value: Any,
                event_ms: Optional[int] = None) -> None:
        """Sends a record of a re-keying agent's source topic to the topic it reads on
        from (``group_by``: keyed by the agent's key function, ``through``: as it is),
        with its origin and its timestamp (the event time when its topic extracts one);
        the rest of the agent runs on the tasks of that topic.  Part of
        ``msg``'s batch: committed with its offset (exactly-once: in its transaction)."""
        agent = runner.agent
        target = self.app.topics[agent.regroup.topic]
        try:
            source = self.app.topics[msg.topic()]
            rekey = runner.stream.rekey
            if rekey is not None:
                key = target.encode_key(rekey(value))
            elif source.key_serializer == target.key_serializer:
                key = msg.key()
            else:
                key = target.encode_key(source.decode_key(msg.key()))
            data = (msg.value() if source.value_serializer == target.value_serializer
                    else target.encode_value(value))
            header = self.stamper.header(agent.name, msg.topic(), msg.partition(), msg.offset())
            kind, stamp = msg.timestamp()  # event time goes on with the record (windows)
            if event_ms is not None:
                kind, stamp = 1, event_ms
            produce(self.committer.producer_for(msg), target.name, data, key, [header],
                    timestamp=stamp if kind and stamp > 0 else 0)
        except Exception as exc:  # noqa: BLE001 - the agent's error policy decides
            self.on_agent_error(agent, msg, exc)

    def emit(self, agent: Agent, msg: Message, value: Any) -> None:
        """Sends a value the agent yielded to each of its sinks, keyed like its input.  An
        output too large to produce raises :class:`RecordTooLarge` here, in the agent's
        record: its policy applies to ``msg`` (dead-lettered by default)."""
        if self.committer.refused_before(msg):
            raise RecordTooLarge("the broker refused an output of this record as too large "
                                 "(its transaction was aborted and the record read again)")
        key = msg.key()
        producer = self.committer.producer_for(msg)
        on_delivery = functools.partial(self._on_output_delivery, agent, msg)
        for sink in agent.sinks:
            headers = None
            if sink.name in self.self_fed:
                headers = [self.stamper.header(agent.name, msg.topic(), msg.partition(),
                                               msg.offset())]
            produce(producer, sink.name, sink.encode_value(value), key, headers,
                    on_delivery=on_delivery)

    def _on_output_delivery(self, agent: Agent, source: Message, err: Optional[KafkaError],
                            msg: Message) -> None:
        """Delivery report of an output of ``source``.  An output the broker refused as
        too large is not a failed batch (that would read the record again and again): at
        least once, ``source`` is dead-lettered now (the flush waiting for this report
        waits for the dead letter too); exactly-once, the transaction fails anyway, so the
        record is remembered and dead-lettered when it is read again (:meth:`emit`)."""
        if err is None:
            return
        if is_too_large(err) and agent.on_error != "crash":
            if not self.committer.will_read_again(source):
                self.errors += 1
                self._count_failure(agent, source)
                log_failure(agent, source, RecordTooLarge(f"{msg.topic()}: {err.str()}"))
                if agent.on_error == "dlq":
                    dead_letter(self.committer.producer_for(source), agent, source,
                                RecordTooLarge(f"{msg.topic()}: {err.str()}"),
                                self.max_message_bytes)
                return
        self._delivery_errors.append(f"{msg.topic()}: {err.str()}")

    # -- errors -----------------------------------------------------------------------
    def on_agent_error(self, agent: Agent, msg: Optional[Message], exc: BaseException) -> None:
        """A record could not be decoded, or the agent raised on it: apply its policy.  An
        unreachable Schema Registry is not the record's fault: it stops the child."""
        if msg is None or isinstance(exc, CodecUnavailable):
            raise exc
        if self.state.enabled:
            self.state.rollback_record(msg)
        if isinstance(exc, LateRecordError):  # the table's on_late="dlq", not the agent's
            log.info("agent %s: %s[%d]@%d is late: %s; dead-lettered to %s", agent.name,
                     msg.topic(), msg.partition(), msg.offset(), exc, agent.dlq_topic)
            dead_letter(self.committer.producer_for(msg), agent, msg, exc, self.max_message_bytes)
            return
        self.errors += 1
        self._count_failure(agent, msg)
        log_failure(agent, msg, exc)
        if agent.on_error == "crash":
            raise exc
        if agent.on_error == "dlq":
            dead_letter(self.committer.producer_for(msg), agent, msg, exc, self.max_message_bytes)

    def _count_failure(self, agent: Agent, msg: Message) -> None:
        """A failed record counts as dead-lettered or skipped, by the agent's policy."""
        counter = {"dlq": self.dead_lettered_by, "skip": self.skipped_by}.get(agent.on_error)
        if counter is not None:
            counter._inc((msg.topic(), str(msg.partition())), 1)

    def on_consume_error(self, msg: Message) -> None:
        err = msg.error()
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("consumer: %s", err.str())

    def close(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()
        for runner in self.runners:
            runner.stop()
        try:
            self.committer.close()
        finally:
            self.state.close_all()
            self.global_tables.close()  # the global tables' copies this child opened
            self.consumer.close()
