"""The child process's runtime: the whole data path of a record, top to bottom.

    consume → decode → agent → sinks, dead letters, changelog → acknowledged
            → LMDB commit (state + offsets) → report offsets

A child reads its partitions with ``assign()`` (it is not a group member), runs the
records of a batch through the agents, and (:meth:`Worker.settle`) once the broker has
acknowledged every record the batch produced, commits its table state and reports
"processed up to" offsets to the supervisor, which commits them as the group member.
Up to :data:`MAX_UNSETTLED` batches are processed while earlier ones wait for their
acknowledgements; they settle in order.  A crash anywhere before the report means the
batch is read again: at-least-once, nothing lost, no state applied twice.

Exactly-once (:meth:`Worker.settle_transactions`) replaces step 4: each task's outputs,
changelog records and input offsets commit as one Kafka transaction every
``commit_interval``; the LMDB commit follows it, and a transaction the broker refuses is
aborted and its records read again (:meth:`Worker.rewind`).
"""
from __future__ import annotations

import asyncio
import base64
import functools
import logging
import os
import select
import signal
import time
import traceback
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from .agents import AgentRunner, AsyncAgentRunner, SyncAgentRunner
from .app import Agent, App
from .logs import set_role
from .produce import (DEFAULT_MESSAGE_MAX_BYTES, RecordTooLarge, fit_dead_letter, is_too_large,
                      message_max_bytes, produce)
from .protocol import (BrokerUnavailable, Channel, ChannelClosed, call_while_unreachable,
                       says_broker_unreachable)
from .state import TaskStates
from .topology import TopicPartitionKey, group_by_task, task_id, task_partitions, task_sort_key
from .transactions import COMMIT_BEFORE, TransactionAborted, Transactions

log = logging.getLogger("shardworker.worker")

STATS_INTERVAL = 1.0       # seconds between heartbeats with stats to the supervisor
MAX_UNSETTLED = 4          # batches processed ahead of their acknowledgements, at most
SETTLE_WITHIN = 0.05       # seconds a batch may wait for its acknowledgements unforced
REPORT_INTERVAL = 0.05     # offsets are reported at most this often (and at every stop)
CHUNK_SECONDS = 0.5        # exactly-once: a batch is processed in chunks of about this long


def _record_id(msg: Message) -> Tuple[str, int, int]:
    return msg.topic(), msg.partition(), msg.offset()


class DeliveryFailed(RuntimeError):
    """The broker refused or lost an output record: its input must not be committed."""


class Worker:
    """Runs the app's agents over the partitions the supervisor assigns to this child."""

    def __init__(self, app: App, channel: Channel, bootstrap: str, index: int,
                 datadir: str = ".") -> None:
        self.app = app
        self.datadir = datadir
        self.channel = channel
        self.bootstrap = bootstrap
        self.index = index
        self.source_topics = app.source_topics
        self.batch_size = int(app.settings["batch_size"])
        self.commit_interval = float(app.settings["commit_interval"])
        self._last_commit = 0.0
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
        #: exactly-once: input records whose output the broker refused as too large; the
        #: aborted transaction reads them again, and then they are dead-lettered
        self._refused_inputs: Set[Tuple[str, int, int]] = set()
        #: the producers' ``message.max.bytes``: a dead letter is truncated to fit it
        self.max_message_bytes = DEFAULT_MESSAGE_MAX_BYTES
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.runners: List[AgentRunner] = []
        #: the supervisor's messages received and not acted on yet (see handle_control)
        self.control: Deque[Dict[str, Any]] = deque()
        self.routes: Dict[str, List[AgentRunner]] = {}
        self._timer_due: Dict[str, float] = {}
        #: batches processed whose outputs are not known to be acknowledged yet, in order
        self.unsettled: List[Tuple[float, Dict[TopicPartitionKey, int], List[Any]]] = []
        #: exactly-once: records per chunk of a batch (:meth:`process`), and the partitions
        #: rewound by an aborted transaction while the batch was being processed
        self._chunk = 1
        self._rewound: Set[TopicPartitionKey] = set()

    # -- set-up ---------------------------------------------------------------------
    def setup(self) -> None:
        """Creates this process's Kafka clients and starts its agents (after exec)."""
        app = self.app
        consumer_config = {
            **app.kafka_config(self.bootstrap),
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
        client_id = f"{app.id}-child-{self.index}"
        #: exactly-once: one transactional producer per task, else one for the child
        self.transactions: Optional[Transactions] = None
        self.producer: Optional[Producer] = None
        if app.exactly_once:
            self.transactions = Transactions(app, self.bootstrap, client_id, self._on_delivery,
                                             heartbeat=self.heartbeat)
        else:
            self.producer = Producer({
                **app.producer_config(self.bootstrap),
                "client.id": client_id,
                "on_delivery": self._on_delivery,
                # changelog offsets come back in delivery reports, so tables need them all
                "delivery.report.only.error": not app.tables,
            })
            app._producer = self.producer  # topic.send() inside agents and timers uses it
        self.state = TaskStates(app, self.datadir, consumer_config, self.producer_for_task,
                                heartbeat=lambda: self.report(force=False),
                                delivery_errors=self._delivery_errors)
        if any(agent.is_async for agent in app.agents) or any(
                asyncio.iscoroutinefunction(t.fn) for t in app.timers):
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        for agent in app.agents:
            runner: AgentRunner
            if agent.is_async:
                assert self.loop is not None
                runner = AsyncAgentRunner(agent, self.emit, self.on_agent_error, self.loop)
            else:
                runner = SyncAgentRunner(agent, self.emit, self.on_agent_error)
            if self.transactions is not None:
                runner.stream.on_record = self.on_record_in_transaction
            elif app.tables:
                runner.stream.on_record = self.state.on_record
            runner.stream.on_progress = lambda: self.report(force=False)
            runner.start()
            self.runners.append(runner)
            self.routes.setdefault(agent.topic.name, []).append(runner)
        signal.signal(signal.SIGTERM, self._on_term)

    def producer_for(self, msg: Message) -> Producer:
        """Where the outputs of ``msg`` go: the child's producer, or (exactly-once) its
        task's producer with a transaction open."""
        if self.transactions is None:
            return self.producer  # type: ignore[return-value]
        return self.transactions.for_partition(msg.topic(), msg.partition())

    def producer_for_task(self, task: str) -> Producer:
        if self.transactions is None:
            return self.producer  # type: ignore[return-value]
        return self.transactions.for_task(task)

    def on_record_in_transaction(self, msg: Message) -> None:
        """Exactly-once: the record's task's transaction also takes what the agent sends
        with ``topic.send()``; the record becomes the tables' too."""
        self.app._producer = self.producer_for(msg)
        if self.state.enabled:
            self.state.on_record(msg)

    def heartbeat(self) -> None:
        """Tells the supervisor this child is alive while it waits for the broker (the
        throttled :meth:`report`)."""
        self.report(force=False)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _on_delivery(self, err: Optional[KafkaError], msg: Message) -> None:
        if err is not None:  # only errors are reported (delivery.report.only.error)
            self._delivery_errors.append(f"{msg.topic()}: {err.str()}")

    # -- the loop -------------------------------------------------------------------
    def run(self) -> int:
        """Processes batches until told to stop; returns the process's exit code."""
        self.setup()
        self.channel.send("ready", pid=os.getpid())
        try:
            while not self.stopping:
                self.handle_control(timeout=0)
                records = self.consumer.consume(self.batch_size, 0.1) if self.positions else None
                if records:
                    self.process(records)
                elif not self.positions:
                    self.handle_control(timeout=0.1)  # nothing assigned: wait for work
                self.settle(block=False)
                self.run_timers()
                self.report(force=False)
            self.settle(block=True)
            self.report(force=True)
            self.channel.send("bye", offsets=self._offsets_list(self.positions))
            return 0
        except ChannelClosed:
            log.error("the supervisor has gone; exiting without committing")
            return 1
        finally:
            self.close()

    def process(self, records: List[Message]) -> None:
        """One batch: decode, run the agents, produce; :meth:`settle` advances its offsets
        once the broker has acknowledged everything it produced.  Batches overlap: the
        next one is processed while the broker acknowledges this one.

        Exactly-once, a batch goes through in chunks sized to take about
        :data:`CHUNK_SECONDS` each (from the time records took so far), with a chance to
        commit after each: a batch of slow records never holds a transaction open past
        ``transaction.timeout.ms``, after which the broker would abort it and fence the
        task's producer.  Records of a task whose transaction aborted meanwhile are
        dropped from the rest of the batch: they are read again from the last commit."""
        if self.transactions is None:
            self.process_chunk(records)
            return
        self._rewound.clear()
        done = 0
        while done < len(records):
            chunk = records[done:done + self._chunk]
            done += len(chunk)
            if self._rewound:
                chunk = [m for m in chunk if (m.topic(), m.partition()) not in self._rewound]
            began = time.monotonic()
            self.process_chunk(chunk)
            self._size_chunks(len(chunk), time.monotonic() - began)
            self.settle_transactions(block=False)  # commits when the interval or age is due

    def _size_chunks(self, count: int, elapsed: float) -> None:
        """The next chunk's size: what takes :data:`CHUNK_SECONDS` at the speed just seen,
        at most four times the last (a slowdown shows within a few records), at least 1."""
        if count <= 0:
            return
        fits = int(CHUNK_SECONDS * count / elapsed) if elapsed > 0 else self.batch_size
        self._chunk = max(1, min(fits, self._chunk * 4, self.batch_size))

    def process_chunk(self, records: List[Message]) -> None:
        """Steps 1-3 for ``records``: decode, run the agents, drain the tables' changes."""
        positions: Dict[TopicPartitionKey, int] = {}
        routes = self.routes
        # 1. decode each record and queue it for the agents of its topic
        for msg in records:
            if msg.error() is not None:
                self.on_consume_error(msg)
                continue
            topic = msg.topic()
            runners = routes.get(topic)
            if runners:
                try:
                    value = runners[0].agent.topic.decode_value(msg.value())
                except Exception as exc:  # noqa: BLE001 - a bad record, not a bad worker
                    for runner in runners:
                        self.on_agent_error(runner.agent, msg, exc)
                else:
                    for runner in runners:
                        runner.stream.buffer.append((value, msg))
            positions[(topic, msg.partition())] = msg.offset() + 1
        # 2. the agents process their share (what they yield is produced to their sinks)
        for runner in self.runners:
            if runner.stream.buffer:
                runner.drain()
            if runner.fatal is not None:
                raise runner.fatal
        # 3. the tables' changes of the batch: one changelog record per changed key
        changes = self.state.drain(positions) if self.state.enabled else []
        self.processed += len(records)  # stats count processing; offsets wait for acks
        self.unsettled.append((time.monotonic(), positions, changes))

    def settle(self, block: bool) -> None:
        """Steps 4-6 of every batch whose outputs are acknowledged, in batch order."""
        if self.transactions is not None:
            self.settle_transactions(block)
            return
        if not self.unsettled:
            return
        overdue = time.monotonic() - self.unsettled[0][0] >= SETTLE_WITHIN
        if block or overdue or len(self.unsettled) >= MAX_UNSETTLED:
            self.flush()
        else:
            self.producer.poll(0)  # type: ignore[union-attr]
            if len(self.producer):  # type: ignore[arg-type]
                return  # something produced is still unacknowledged
            self.flush()  # nothing outstanding: returns at once, checks delivery errors
        for _began, positions, changes in self.unsettled:
            # 4. every output, dead letter and changelog record is acknowledged, so:
            # 5. the state commits: state + input offsets + changelog offsets, then
            self.state.commit(changes)
            # 6. the batch's offsets count as processed (reported to the supervisor)
            self.positions.update(positions)
        self.unsettled.clear()

    def settle_transactions(self, block: bool) -> None:
        """Exactly-once steps 4-6, every ``commit_interval`` (at once when ``block``): per
        task, outputs + changelog records + input offsets in one Kafka transaction, then
        the LMDB commit, then the offsets count as processed."""
        transactions = self.transactions
        assert transactions is not None
        now = time.monotonic()
        if (not block and now - self._last_commit < self.commit_interval
                and transactions.oldest_age(now) < COMMIT_BEFORE):
            return
        self._last_commit = now
        positions: Dict[TopicPartitionKey, int] = {}
        drained: Dict[str, List[Any]] = {}
        for _began, batch_positions, changes in self.unsettled:
            positions.update(batch_positions)
            for batch in changes:
                drained.setdefault(batch.task.task_id, []).append(batch)
        self.unsettled.clear()
        self._delivery_errors.clear()  # a failed delivery fails its transaction's commit
        tasks = set(group_by_task(self.source_topics, positions))
        tasks.update(task for task, txn in transactions.by_task.items() if txn.open)
        for task in sorted(tasks, key=task_sort_key):
            offsets = {tp: positions.get(tp, self.positions.get(tp, -1))
                       for tp in task_partitions(self.source_topics, task)}
            offsets = {tp: offset for tp, offset in offsets.items() if offset >= 0}
            try:
                # 4. outputs, changelog records and input offsets: one Kafka transaction
                transactions.by_task[task].commit(offsets, transactions.group_metadata)
            except TransactionAborted as exc:
                log.warning("%s; reading its records again from the last commit", exc)
                self.rewind(task)
                continue
            # 5. the state commits after Kafka (a crash in between restores the changelog)
            for batch in drained.get(task, ()):
                batch.commit()
            # 6. the offsets count as processed (already committed: reported for handover)
            self.positions.update(offsets)

    def rewind(self, task: str) -> None:
        """After an aborted transaction: drops the task's uncommitted table changes and
        reads its partitions again from the last committed offsets."""
        self.state.abort(task)
        self._rewound.update(task_partitions(self.source_topics, task))
        tps = [TopicPartition(t, p, self.positions[(t, p)])
               for t, p in task_partitions(self.source_topics, task) if (t, p) in self.positions]
        self.consumer.incremental_unassign(tps)
        self.consumer.incremental_assign(tps)

    def emit(self, agent: Agent, msg: Message, value: Any) -> None:
        """Sends a value the agent yielded to each of its sinks, keyed like its input.  An
        output too large to produce raises :class:`RecordTooLarge` here, in the agent's
        record: its policy applies to ``msg`` (dead-lettered by default)."""
        if self._refused_inputs and _record_id(msg) in self._refused_inputs:
            self._refused_inputs.discard(_record_id(msg))
            raise RecordTooLarge("the broker refused an output of this record as too large "
                                 "(its transaction was aborted and the record read again)")
        key = msg.key()
        producer = self.producer_for(msg)
        on_delivery = functools.partial(self._on_output_delivery, agent, msg)
        for sink in agent.sinks:
            produce(producer, sink.name, sink.encode_value(value), key, on_delivery=on_delivery)

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
            if self.transactions is not None:
                self._refused_inputs.add(_record_id(source))
            else:
                self.errors += 1
                self.log_agent_error(agent, source, RecordTooLarge(f"{msg.topic()}: {err.str()}"))
                if agent.on_error == "dlq":
                    self.dead_letter(agent, source, RecordTooLarge(f"{msg.topic()}: {err.str()}"))
                return
        self._delivery_errors.append(f"{msg.topic()}: {err.str()}")

    #: seconds of one wait for acknowledgements: shorter than the heartbeat interval
    FLUSH_SLICE = 0.5

    def flush(self) -> None:
        """Waits for the broker to acknowledge everything produced so far, however long it
        is away: in slices, with a heartbeat to the supervisor after each, so a child
        waiting on an unreachable broker is never taken for a hung one.  librdkafka
        retries every record until its ``message.timeout.ms``; only a failed delivery
        ends the wait (:meth:`raise_delivery_errors`)."""
        while True:
            left = self.producer.flush(self.FLUSH_SLICE)  # type: ignore[union-attr]
            if not left or self._delivery_errors:
                break
            self.report(force=False)
        if self._delivery_errors:
            self.raise_delivery_errors()

    def raise_delivery_errors(self) -> None:
        """A batch whose outputs failed is read again after a restart.  When every error
        says the broker could not be reached, that is :class:`BrokerUnavailable` (the
        supervisor restarts the child without counting a crash); any other is a refusal
        of what was sent: :class:`DeliveryFailed`."""
        errors = "; ".join(self._delivery_errors[:3])
        if all(says_broker_unreachable(error) for error in self._delivery_errors):
            raise BrokerUnavailable(f"the broker did not acknowledge outputs in time: {errors}")
        raise DeliveryFailed(f"outputs not acknowledged, batch will be redelivered: {errors}")

    # -- errors -----------------------------------------------------------------------
    def on_agent_error(self, agent: Agent, msg: Optional[Message], exc: BaseException) -> None:
        """A record could not be decoded, or the agent raised on it: apply its policy."""
        if msg is None:
            raise exc
        if self.state.enabled:
            self.state.rollback_record()
        self.errors += 1
        self.log_agent_error(agent, msg, exc)
        if agent.on_error == "crash":
            raise exc
        if agent.on_error == "dlq":
            self.dead_letter(agent, msg, exc)

    @staticmethod
    def log_agent_error(agent: Agent, msg: Message, exc: BaseException) -> None:
        """One line per failed record: where, what, and what its policy does with it."""
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        if agent.on_error == "crash":
            log.error("agent %s failed on %s: %r; stopping the child", agent.name, where, exc)
            return
        log.error("agent %s failed on %s: %s: %s (%s)", agent.name, where, type(exc).__name__,
                  exc, "dead-lettered to " + agent.dlq_topic if agent.on_error == "dlq" else "skipped")

    def dead_letter(self, agent: Agent, msg: Message, exc: BaseException) -> None:
        """Sends ``msg`` to the agent's dead-letter topic with the error in its headers.
        A dead letter too large for ``message.max.bytes`` goes with its payload truncated
        (header ``shardsup.truncated``: the original length); one that cannot fit even
        then (a huge key) is logged and dropped: never a crash loop (DESIGN.md, "Bad input
        and errors")."""
        headers = list(msg.headers() or ()) + [
            ("shardsup.error", f"{type(exc).__name__}: {exc}".encode()[:4000]),
            ("shardsup.traceback", "".join(traceback.format_exception(
                type(exc), exc, exc.__traceback__)).encode()[-8000:]),
            ("shardsup.agent", agent.name.encode()),
            ("shardsup.topic", msg.topic().encode()),
            ("shardsup.partition", str(msg.partition()).encode()),
            ("shardsup.offset", str(msg.offset()).encode()),
        ]
        producer = self.producer_for(msg)
        try:
            produce(producer, agent.dlq_topic, msg.value(), msg.key(), headers)
            return
        except RecordTooLarge:
            value, headers = fit_dead_letter(msg.value(), msg.key(), headers, self.max_message_bytes)
        try:
            produce(producer, agent.dlq_topic, value, msg.key(), headers)
        except RecordTooLarge as exc2:
            log.error("dead letter of %s[%d]@%d dropped: %s", msg.topic(), msg.partition(),
                      msg.offset(), exc2)

    def on_consume_error(self, msg: Message) -> None:
        err = msg.error()
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("consumer: %s", err.str())

    # -- talking to the supervisor --------------------------------------------------
    def handle_control(self, timeout: float) -> None:
        """Acts on the supervisor's messages, in the order they came; called only between
        batches.  Those that arrive while an ``assign`` restores a task wait in
        :attr:`control`, where the restore looks for a ``stop`` or ``revoke``."""
        if timeout and not self.control and not select.select([self.channel], [], [], timeout)[0]:
            return
        self.control.extend(self.channel.receive())
        while self.control:
            message = self.control.popleft()
            op = message["op"]
            if op == "assign":
                self.assign(message["partitions"])
            elif op == "revoke":
                self.revoke(message["partitions"])
            elif op == "stop":
                self.stopping = True
            elif op == "group" and self.transactions is not None:
                self.transactions.group_metadata = base64.b64decode(message["metadata"])
            elif op == "timers":
                self.runs_timers = bool(message["run"])

    def assign(self, partitions: List[List[Any]]) -> None:
        if self.transactions is not None:  # fences the tasks' previous owners first
            self.transactions.open(group_by_task(self.source_topics, [(t, p) for t, p, _o in partitions]))
        partitions = self.committed_starts(partitions)
        if self.state.enabled:
            partitions = self._open_tasks(partitions)
        tps = [TopicPartition(topic, part, offset) for topic, part, offset in partitions]
        if tps:
            self.consumer.incremental_assign(tps)
        for topic, part, _offset in partitions:
            self.positions.setdefault((topic, part), _offset)
        self._tasks_changed()
        log.info("assigned %s", ", ".join(f"{t}[{p}]@{o}" for t, p, o in partitions))

    def _open_tasks(self, partitions: List[List[Any]]) -> List[List[Any]]:
        """Opens (restoring where needed) the tables of each assigned task and returns
        the partitions to assign, each from where its task's state says to read (its own
        input offset when it is ahead of the group's and still exact: DESIGN.md, "State
        (LMDB)").  A task whose restore the supervisor interrupted (a revoke of it, a
        stop) is left out: its progress is kept for the next time."""
        from .state import RestoreInterrupted

        starts: Dict[TopicPartitionKey, int] = {}
        dropped = set()
        for topic, part, offset in partitions:
            if topic != self.state.source:
                continue
            task = task_id(self.source_topics, topic, part)
            self._tasks_changed(restoring=True)
            try:
                starts[(topic, part)] = self.state.open(
                    task, part, offset, should_stop=lambda t=topic, p=part: self._told_to_let_go(t, p))
            except RestoreInterrupted:
                dropped.add(task)
        return [[t, p, starts.get((t, p), o)] for t, p, o in partitions
                if task_id(self.source_topics, t, p) not in dropped]

    def _told_to_let_go(self, topic: str, part: int) -> bool:
        """During a restore: True when the child is stopping, the supervisor has gone, or
        its messages (received so far, in :attr:`control`) hold a ``stop`` or a
        ``revoke`` of ``topic[part]``.  The messages stay queued for
        :meth:`handle_control`, which acts on them, in order, once the restore is over."""
        if self.stopping:
            return True
        try:
            self.control.extend(self.channel.receive())
        except ChannelClosed:
            return True  # handle_control sees it next and the child exits
        return any(m["op"] == "stop" or (m["op"] == "revoke" and [topic, part] in m["partitions"])
                   for m in self.control)

    def committed_starts(self, partitions: List[List[Any]]) -> List[List[Any]]:
        """Exactly-once: where each assigned partition really starts, the group's committed
        offset, read after the tasks' producers are initialised.

        The supervisor hands over the offsets it last heard reported, but a killed child
        may have committed transactions it never reported: starting there would commit
        those outputs a second time.  ``init_transactions`` (in :meth:`Transactions.open`)
        has fenced the previous owner and aborted what it left open, so the committed
        offsets (``read_committed``: OffsetFetch waits for pending transactional offsets,
        and needs no group membership) are final.  A partition with no committed offset
        starts where the supervisor said.  An unreachable broker is waited out with
        heartbeats (BrokerUnavailable after a bound).  At-least-once: unchanged (the supervisor
        commits what children report, so its offsets are the group's).

        First, the open transactions of the tasks this child holds already are committed:
        the restore of the new tasks' tables that follows may outlast
        ``transaction.timeout.ms``."""
        if self.transactions is None or not partitions:
            return partitions
        self.settle(block=True)  # no transaction of a task held already stays open through
        #                          the restore that may follow (transaction.timeout.ms)
        asked = [TopicPartition(topic, part) for topic, part, _o in partitions]
        found = call_while_unreachable(
            lambda timeout: self.consumer.committed(asked, timeout=timeout), self.heartbeat,
            "reading the group's committed offsets")
        committed = {(tp.topic, tp.partition): tp.offset for tp in found}
        starts = []
        for topic, part, given in partitions:
            offset = committed.get((topic, part), -1)
            starts.append([topic, part, offset if offset >= 0 else given])
        log.info("start offsets (the group's committed offsets, the supervisor's in "
                 "brackets): %s", ", ".join(f"{t}[{p}]@{o} ({g})" for (t, p, o), (_t, _p, g)
                                            in zip(starts, partitions)))
        return starts

    def revoke(self, partitions: List[List[Any]]) -> None:
        self.settle(block=True)
        keys = [(topic, part) for topic, part in partitions]
        # a task whose restore was interrupted was never assigned to the consumer
        assigned = [TopicPartition(t, p) for t, p in keys if (t, p) in self.positions]
        if assigned:
            self.consumer.incremental_unassign(assigned)
        final = {k: self.positions.pop(k) for k in keys if k in self.positions}
        for topic, part in keys:
            if topic == self.state.source:
                # marked released: `shardsup table` no longer shows this copy as current
                self.state.close(task_id(self.source_topics, topic, part), released=True)
        if self.transactions is not None:
            for task in group_by_task(self.source_topics, keys):
                self.transactions.close(task)
        for key in keys:
            self._reported.pop(key, None)
        self.channel.send("revoked", offsets=self._offsets_list(final))
        self._tasks_changed()
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in keys))

    def _tasks_changed(self, restoring: bool = False) -> None:
        self.tasks = sorted(group_by_task(self.source_topics, self.positions), key=task_sort_key)
        if restoring:
            self.channel.send("stats", processed=self.processed, errors=self.errors,
                              tasks=self.tasks, lag={}, restoring=True)
        label = ",".join(self.tasks) or "idle"
        set_role(f"child {label}")
        try:
            from setproctitle import setproctitle

            setproctitle(f"shardsup: {self.app.id} child {label}")
        except ImportError:  # pragma: no cover - a declared dependency
            pass

    def report(self, force: bool) -> None:
        """Sends changed offsets (throttled) and, every second, a heartbeat with stats."""
        now = time.monotonic()
        if force or now - self._last_report >= REPORT_INTERVAL:
            changed = {k: v for k, v in self.positions.items()
                       if v >= 0 and self._reported.get(k) != v}
            if changed:
                self.channel.send("offsets", offsets=self._offsets_list(changed))
                self._reported.update(changed)
            self._last_report = now
        if now - self._last_stats >= STATS_INTERVAL:
            self.channel.send("stats", processed=self.processed, errors=self.errors,
                              tasks=self.tasks, lag={} if self.state.restoring else self.lag(),
                              restoring=self.state.restoring)
            self._last_stats = now

    def lag(self) -> Dict[str, Optional[int]]:
        """Records behind the end of each task's partitions.  The end is the high watermark
        of the last fetch response (right on Kafka and tansu alike; tansu's ListOffsets is
        not), so it is unknown (None) until a first fetch answered."""
        lags: Dict[str, Optional[int]] = {}
        for task, parts in group_by_task(self.source_topics, self.positions).items():
            total: Optional[int] = 0
            for topic, part in parts:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, part),
                                                                cached=True)
                position = self.positions[(topic, part)]
                if high < 0 or total is None:
                    total = None
                    continue
                total += max(0, high - (position if position >= 0 else max(low, 0)))
            lags[task] = total
        return lags

    @staticmethod
    def _offsets_list(offsets: Dict[TopicPartitionKey, int]) -> List[Tuple[str, int, int]]:
        return [(topic, part, off) for (topic, part), off in offsets.items() if off >= 0]

    # -- timers -----------------------------------------------------------------------
    #: set by the supervisor's ``timers`` message: exactly one child (the one with the
    #: lowest running task) runs the app's timers, and it moves when that child fails
    runs_timers = False

    def run_timers(self) -> None:
        """Runs due timers, only in the child the supervisor chose (one in the group)."""
        if not self.app.timers or not self.runs_timers or not self.tasks:
            return
        now = time.monotonic()
        for timer in self.app.timers:
            due = self._timer_due.setdefault(timer.name, now + timer.interval)
            if now < due:
                continue
            self._timer_due[timer.name] = now + timer.interval
            if self.transactions is not None:  # what timers send commits with our first task
                self.app._producer = self.transactions.for_task(self.tasks[0])
            try:
                result = timer.fn()
                if asyncio.iscoroutine(result):
                    assert self.loop is not None
                    self.loop.run_until_complete(result)
            except Exception:  # noqa: BLE001 - a timer's failure is logged, not fatal
                log.exception("timer %s failed", timer.name)
        if self.producer is not None:
            self.producer.poll(0)

    def close(self) -> None:
        for runner in self.runners:
            runner.stop()
        try:
            if self.producer is not None:
                self.producer.flush(5)
            if self.transactions is not None:  # what is not committed is read again
                self.transactions.close_all()
        finally:
            self.state.close_all()
            self.consumer.close()
