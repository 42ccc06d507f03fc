"""The processing guarantee as a strategy: when a processed batch counts as done.

The worker (:mod:`.worker`) decodes a batch, runs the agents and drains the tables'
changes; then it asks its committer which of the batches processed so far the broker now
holds (step 4 of a batch, docs/architecture.md, "A record's path"), and for those commits
the state to LMDB (5) and reports the offsets (6).  The two committers differ only there:

* :class:`AtLeastOnce`: one idempotent producer for the child; a batch is done once the
  broker has acknowledged every record it produced.  A crash before that reads the batch
  again.
* :class:`ExactlyOnce`: one transactional producer per task (:mod:`.transactions`); a
  task's outputs, changelog records and input offsets commit as one Kafka transaction
  every ``commit_interval``; a transaction the broker refuses is aborted and the task's
  records are read again from its last commit.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from .app import App
from .beginning import assignable
from .broker_wait import BrokerUnavailable, call_while_unreachable, says_broker_unreachable
from .connect import connect
from .topology import TopicPartitionKey, offsets_of, sources_of, task_sort_key
from .transactions import COMMIT_BEFORE, TransactionAborted, Transactions

log = logging.getLogger("shardworker.committers")

MAX_UNSETTLED = 4          # batches processed ahead of their acknowledgements, at most
SETTLE_WITHIN = 0.05       # seconds a batch may wait for its acknowledgements unforced
CHUNK_SECONDS = 0.5        # exactly-once: a batch is processed in chunks of about this long

#: a processed batch (or chunk): when, the next offset per partition, its drained tables
Processed = Tuple[float, Dict[TopicPartitionKey, int], List[Any]]
#: what a committer hands back as done: input offsets and the tables' batches to commit
Done = Tuple[Dict[TopicPartitionKey, int], List[Any]]


class DeliveryFailed(RuntimeError):
    """The broker refused or lost an output record: its input must not be committed."""


def record_id(msg: Message) -> Tuple[str, int, int]:
    return msg.topic(), msg.partition(), msg.offset()


class Committer:
    """What the worker asks of a processing guarantee (both committers answer all of it)."""

    #: called by each agent's stream with every record before the agent sees it (after
    #: its tables have made it their current record); None: nothing to do per record
    on_record: Optional[Callable[[Message], None]] = None
    #: True when the tables' changes must be drained after every chunk (a transaction
    #: holds exactly the effects of the records whose offsets it commits)
    drains_every_chunk = False

    def __init__(self, delivery_errors: List[str], heartbeat: Callable[[], None]) -> None:
        #: failed deliveries of outputs, dead letters and changelog records (shared with
        #: the tables' changelog callbacks): a batch with any is not done
        self.delivery_errors = delivery_errors
        #: the worker's heartbeat to the supervisor, sent while a call waits for the broker
        self.heartbeat = heartbeat

    def on_delivery(self, err: Optional[KafkaError], msg: Message) -> None:
        """The producers' delivery report for records without one of their own."""
        if err is not None:
            self.delivery_errors.append(f"{msg.topic()}: {err.str()}")

    def producer_for(self, msg: Message) -> Producer:
        """Where the outputs and dead letters of ``msg`` go."""
        raise NotImplementedError

    def producer_for_task(self, task: str) -> Producer:
        """Where the changelog records of ``task`` go."""
        raise NotImplementedError

    def chunks(self, records: List[Message]) -> Iterator[List[Message]]:
        """The pieces a batch is processed in; the worker settles after each."""
        raise NotImplementedError

    def settle(self, unsettled: List[Processed], block: bool) -> List[Done]:
        """Takes the processed batches the broker now holds out of ``unsettled``: step 4."""
        raise NotImplementedError

    def starts(self, partitions: List[List[Any]], settle_all: Callable[[], None]) -> List[List[Any]]:
        """Where newly assigned ``[topic, partition, offset]`` start reading."""
        raise NotImplementedError

    # at least once, the answers below: nothing is held per task, and a batch commits
    # whole, even with an output the broker refused (its record is dead-lettered)
    def before_timers(self, tasks: List[str]) -> None:
        """Chooses the producer what timers send goes to (the child's, at least once)."""

    def will_read_again(self, msg: Message) -> bool:
        """An output of ``msg`` was refused as too large: is ``msg`` read again (and
        dead-lettered then) rather than dead-lettered now?"""
        return False

    def refused_before(self, msg: Message) -> bool:
        """Is ``msg`` read again because an output of it was refused before?"""
        return False

    def released(self, tasks: List[str]) -> None:
        """``tasks`` were revoked from this child."""

    def set_group_metadata(self, metadata: bytes) -> None:
        """The supervisor's ``consumer_group_metadata()`` (for transactional commits)."""

    def poll(self) -> None:
        """Serves delivery reports between batches."""

    def close(self) -> None:
        """The child ends: what is not committed is read again by the next owner."""


class AtLeastOnce(Committer):
    """One idempotent producer; a batch is done when all it produced is acknowledged."""

    #: seconds of one wait for acknowledgements: shorter than the heartbeat interval
    FLUSH_SLICE = 0.5

    def __init__(self, app: App, producer_config: Dict[str, Any],
                 delivery_errors: List[str], heartbeat: Callable[[], None]) -> None:
        super().__init__(delivery_errors, heartbeat)
        self.producer = Producer({
            **producer_config,
            "on_delivery": self.on_delivery,
            # changelog offsets come back in delivery reports, so tables need them all
            "delivery.report.only.error": not app.tables,
        })
        app._producer = self.producer  # topic.send() inside agents and timers uses it
        self._connected = False

    # -- where a record's outputs go -------------------------------------------------
    def producer_for(self, msg: Message) -> Producer:
        return self.producer

    def producer_for_task(self, task: str) -> Producer:
        return self.producer

    # -- processing and settling -----------------------------------------------------
    def chunks(self, records: List[Message]) -> Iterator[List[Message]]:
        """A batch is processed whole."""
        yield records

    def settle(self, unsettled: List[Processed], block: bool) -> List[Done]:
        """The batches whose outputs are all acknowledged: every one once the producer's
        queue is empty.  Waits for that when ``block``, when the oldest batch is overdue
        or when too many are waiting; otherwise returns nothing while records are
        outstanding."""
        if not unsettled:
            return []
        overdue = time.monotonic() - unsettled[0][0] >= SETTLE_WITHIN
        if not (block or overdue or len(unsettled) >= MAX_UNSETTLED):
            self.producer.poll(0)
            if len(self.producer):
                return []  # something produced is still unacknowledged
        self.flush()  # at once when nothing is outstanding; raises on a failed delivery
        done = [(positions, changes) for _began, positions, changes in unsettled]
        unsettled.clear()
        return done

    def flush(self) -> None:
        """Waits for the broker to acknowledge everything produced so far, however long
        it is away: in slices, with a heartbeat to the supervisor after each, so a child
        waiting on an unreachable broker is never taken for a hung one.  librdkafka
        retries every record until its ``message.timeout.ms``; only a failed delivery
        ends the wait (:meth:`raise_delivery_errors`)."""
        while True:
            left = self.producer.flush(self.FLUSH_SLICE)
            if not left or self.delivery_errors:
                break
            self.heartbeat()
        if self.delivery_errors:
            self.raise_delivery_errors()

    def raise_delivery_errors(self) -> None:
        """A batch whose outputs failed is read again after a restart.  When every error
        says the broker could not be reached, that is :class:`BrokerUnavailable` (the
        supervisor restarts the child without counting a crash); any other is a refusal
        of what was sent: :class:`DeliveryFailed`."""
        errors = "; ".join(self.delivery_errors[:3])
        if all(says_broker_unreachable(error) for error in self.delivery_errors):
            raise BrokerUnavailable(f"the broker did not acknowledge outputs in time: {errors}")
        raise DeliveryFailed(f"outputs not acknowledged, batch will be redelivered: {errors}")

    # -- tasks coming and going ------------------------------------------------------
    def starts(self, partitions: List[List[Any]], settle_all: Callable[[], None]) -> List[List[Any]]:
        """Where assigned partitions start: where the supervisor says (it commits what
        children report, so its offsets are the group's).  At the first, the producer
        is connected to a broker (:mod:`.connect`: its first batch is acknowledged up
        to 1 s sooner)."""
        if partitions and not self._connected:
            self._connected = True
            connect(self.producer, partitions[0][0])
        return partitions

    def poll(self) -> None:
        self.producer.poll(0)

    def close(self) -> None:
        self.producer.flush(5)


class ExactlyOnce(Committer):
    """One transaction per task: outputs, changelog and input offsets commit together."""

    drains_every_chunk = True

    def __init__(self, app: App, bootstrap: str, client_id: str, delivery_errors: List[str],
                 heartbeat: Callable[[], None], consumer: Consumer, state: Any,
                 positions: Dict[TopicPartitionKey, int]) -> None:
        super().__init__(delivery_errors, heartbeat)
        self.app = app
        self.consumer = consumer
        self.state = state
        #: the worker's processed positions (read here: where a rewound task starts again)
        self.positions = positions
        self.topology = app.topology
        self.commit_interval = float(app.settings["commit_interval"])
        self.batch_size = int(app.settings["batch_size"])
        self.transactions = Transactions(app, bootstrap, client_id, self.on_delivery,
                                         heartbeat=heartbeat)
        self._last_commit = 0.0
        #: records per chunk of a batch (:meth:`chunks`)
        self._chunk = 1
        #: partitions rewound by an aborted transaction while a batch was being processed
        self._rewound: Set[TopicPartitionKey] = set()
        #: input records whose output the broker refused as too large; the aborted
        #: transaction reads them again, and then they are dead-lettered
        self._refused_inputs: Set[Tuple[str, int, int]] = set()
        #: the first offset read per partition that has no processed offset yet
        self._first_read: Dict[TopicPartitionKey, int] = {}
        self.on_record: Optional[Callable[[Message], None]] = self._on_record

    # -- where a record's outputs go -------------------------------------------------
    def producer_for(self, msg: Message) -> Producer:
        """The record's task's producer, its transaction begun."""
        return self.transactions.for_partition(msg.topic(), msg.partition())

    def producer_for_task(self, task: str) -> Producer:
        return self.transactions.for_task(task)

    def _on_record(self, msg: Message) -> None:
        """The record's task's transaction also takes what the agent sends with
        ``topic.send()``."""
        self.app._producer = self.producer_for(msg)

    def before_timers(self, tasks: List[str]) -> None:
        """What timers send commits with the child's first task."""
        self.app._producer = self.transactions.for_task(tasks[0])

    def will_read_again(self, msg: Message) -> bool:
        """An output of ``msg`` was refused as too large: the transaction fails, so the
        record is remembered and dead-lettered when it is read again (True)."""
        self._refused_inputs.add(record_id(msg))
        return True

    def refused_before(self, msg: Message) -> bool:
        """True (once) for a record read again because its output was refused."""
        if self._refused_inputs and record_id(msg) in self._refused_inputs:
            self._refused_inputs.discard(record_id(msg))
            return True
        return False

    # -- processing and settling -----------------------------------------------------
    def chunks(self, records: List[Message]) -> Iterator[List[Message]]:
        """A batch in chunks sized to take about :data:`CHUNK_SECONDS` each (from the time
        records took so far), so a batch of slow records never holds a transaction open
        past ``transaction.timeout.ms``, after which the broker would abort it and fence
        the task's producer.  The worker may settle after each.  Records of a task whose
        transaction aborted meanwhile are left out: they are read again from the last
        commit."""
        self._rewound.clear()
        self._note_first_offsets(records)
        done = 0
        while done < len(records):
            chunk = records[done:done + self._chunk]
            done += len(chunk)
            if self._rewound:
                chunk = [m for m in chunk if (m.topic(), m.partition()) not in self._rewound]
            began = time.monotonic()
            yield chunk
            self._size_chunks(len(chunk), time.monotonic() - began)

    def _note_first_offsets(self, records: List[Message]) -> None:
        """The first offset read of each partition that started at a logical offset and
        has committed nothing: where a rewind goes back to (``latest`` would otherwise
        skip the aborted records).  Per batch, in C: a partition that stays idle keeps
        its logical position, and this runs for every batch then."""
        first = self._first_read
        waiting = [tp for tp, offset in self.positions.items() if offset < 0 and tp not in first]
        if not waiting:
            return
        # the reversed pairs: each partition's first record is the one its key keeps
        earliest = dict(zip(reversed(sources_of(records)), reversed(offsets_of(records))))
        for tp in waiting:
            offset = earliest.get(tp, -1)
            if offset >= 0:  # an error event carries no record's offset
                first[tp] = offset

    def _size_chunks(self, count: int, elapsed: float) -> None:
        """The next chunk's size: what takes :data:`CHUNK_SECONDS` at the speed just seen,
        at most four times the last (a slowdown shows within a few records), at least 1."""
        if count <= 0:
            return
        fits = int(CHUNK_SECONDS * count / elapsed) if elapsed > 0 else self.batch_size
        self._chunk = max(1, min(fits, self._chunk * 4, self.batch_size))

    def settle(self, unsettled: List[Processed], block: bool) -> List[Done]:
        """Every ``commit_interval`` (at once when ``block``, or when a transaction nears
        its timeout): per task, outputs + changelog records + input offsets in one Kafka
        transaction.  Returns what committed; a refused transaction is aborted and its
        task rewound (:meth:`rewind`)."""
        transactions = self.transactions
        now = time.monotonic()
        if (not block and now - self._last_commit < self.commit_interval
                and transactions.oldest_age(now) < COMMIT_BEFORE):
            return []
        self._last_commit = now
        positions: Dict[TopicPartitionKey, int] = {}
        drained: Dict[str, List[Any]] = {}
        for _began, batch_positions, changes in unsettled:
            positions.update(batch_positions)
            for batch in changes:
                drained.setdefault(batch.task.task_id, []).append(batch)
        unsettled.clear()
        self.delivery_errors.clear()  # a failed delivery fails its transaction's commit
        tasks = set(self.topology.group_by_task(positions))
        tasks.update(task for task, txn in transactions.by_task.items() if txn.open)
        done: List[Done] = []
        for task in sorted(tasks, key=task_sort_key):
            offsets = {tp: positions.get(tp, self.positions.get(tp, -1))
                       for tp in self.topology.task_partitions(task)}
            offsets = {tp: offset for tp, offset in offsets.items() if offset >= 0}
            try:
                transactions.by_task[task].commit(offsets, transactions.group_metadata)
            except TransactionAborted as exc:
                log.warning("%s; reading its records again from the last commit", exc)
                self.rewind(task)
                continue
            done.append((offsets, drained.get(task, [])))
        return done

    def rewind(self, task: str) -> None:
        """After an aborted transaction: drops the task's uncommitted table changes and
        reads its partitions again from the last committed offsets."""
        self.state.abort(task)
        self._rewound.update(self.topology.task_partitions(task))
        tps = [assignable(t, p, self.positions[(t, p)] if self.positions[(t, p)] >= 0
                          else self._first_read.get((t, p), self.positions[(t, p)]))
               for t, p in self.topology.task_partitions(task) if (t, p) in self.positions]
        self.consumer.incremental_unassign(tps)
        self.consumer.incremental_assign(tps)

    # -- tasks coming and going ------------------------------------------------------
    def starts(self, partitions: List[List[Any]], settle_all: Callable[[], None]) -> List[List[Any]]:
        """Where assigned partitions really start: the group's committed offsets, read
        after the tasks' producers are initialised.

        ``init_transactions`` fences each task's previous owner and aborts what it left
        open, so the committed offsets (``read_committed``: OffsetFetch waits for pending
        transactional offsets, and needs no group membership) are final.  The supervisor's
        offsets are what it last heard reported, and a killed child may have committed
        transactions it never reported: starting there would commit those outputs a
        second time.  A partition with no committed offset starts where the supervisor
        said.  An unreachable broker is waited out with heartbeats.

        First, the open transactions of the tasks this child holds already are committed
        (``settle_all``): the restore of the new tasks' tables that follows may outlast
        ``transaction.timeout.ms``."""
        if not partitions:
            return partitions
        self.transactions.open(self.topology.group_by_task([(t, p) for t, p, _o in partitions]))
        settle_all()
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

    def released(self, tasks: List[str]) -> None:
        """What a revoked task has not committed is aborted (read again by its next owner)."""
        for task in tasks:
            self.transactions.close(task)
            for tp in self.topology.task_partitions(task):
                self._first_read.pop(tp, None)

    def set_group_metadata(self, metadata: bytes) -> None:
        """The supervisor's ``consumer_group_metadata()``: transactions commit offsets
        for its generation of the group."""
        self.transactions.group_metadata = metadata

    def poll(self) -> None:
        """Delivery reports come with each transaction's flush."""

    def close(self) -> None:
        self.transactions.close_all()  # what is not committed is read again


def make_committer(app: App, bootstrap: str, client_id: str, delivery_errors: List[str],
                   heartbeat: Callable[[], None], consumer: Consumer, state: Any,
                   positions: Dict[TopicPartitionKey, int]) -> Committer:
    """The committer of the app's ``processing_guarantee``."""
    if app.exactly_once:
        return ExactlyOnce(app, bootstrap, client_id, delivery_errors, heartbeat, consumer,
                           state, positions)
    return AtLeastOnce(app, {**app.producer_config(bootstrap), "client.id": client_id},
                       delivery_errors, heartbeat)
