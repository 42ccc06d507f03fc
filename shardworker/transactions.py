"""Exactly-once: one transactional producer per task (Kafka's KIP-98 and KIP-447).

Under ``processing_guarantee="exactly_once"`` every output of a task (sink records, dead
letters, ``topic.send()`` from the agent, changelog records) goes into that task's open
transaction, and the task's input offsets are committed in the same transaction with the
group metadata of the supervisor (the group member; the child reads with ``assign()``).
Either all of it becomes visible to ``read_committed`` consumers, or none of it does.

``transactional.id`` is ``<app id>-<task>``: stable across restarts and machines, so a new
owner of a task fences the previous one (a zombie child can no longer commit), and its
``init_transactions()`` aborts whatever the previous owner left open.

A broker outage is waited out, not taken for a crash (DESIGN.md, "Processes"): every call
that needs the broker is made in slices of :data:`~.broker_wait.BROKER_SLICE` seconds with a
heartbeat to the supervisor in between, retried while the broker cannot be reached, and
given up after :data:`~.broker_wait.BROKER_WAIT` seconds with
:class:`~.broker_wait.BrokerUnavailable` (the child exits 75 and is restarted uncounted).  A
transaction that outlived the outage (its records timed out, or the broker aborted it)
fails its commit, is aborted and its records read again.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable, Optional

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from .app import App
from . import broker_wait
from .broker_wait import BROKER_SLICE, BrokerUnavailable, call_while_unreachable
from .connect import connect
from .topology import TopicPartitionKey

log = logging.getLogger("shardworker.transactions")

#: how long the broker keeps a transaction open without a word from its producer; after
#: a crash whose task is not taken over this bounds how long read_committed readers wait
TRANSACTION_TIMEOUT_MS = 10_000
#: seconds after which an open transaction commits whatever the commit interval: half the
#: timeout, so a slow batch or a slow broker still commits well before the broker aborts
#: the transaction (and fences the task's producer)
COMMIT_BEFORE = TRANSACTION_TIMEOUT_MS / 1000 / 2
#: seconds a failed transaction's abort waits for the broker before the child gives up
#: (BrokerUnavailable: exit 75, restarted uncounted, and the new producer's
#: ``init_transactions`` aborts it).  An abort after a long outage needs an epoch bump
#: (KIP-360), which some brokers (tansu) never grant: a restart is the way out there
ABORT_WAIT = TRANSACTION_TIMEOUT_MS / 1000
#: seconds a closing task waits for the broker to abort its open transaction: what is not
#: committed never counts anyway (the broker aborts it after ``transaction.timeout.ms``,
#: the task's next owner's ``init_transactions`` at once)
CLOSE_WAIT = 2.0


class TransactionAborted(RuntimeError):
    """The broker refused the task's transaction (the group moved on, a record was not
    delivered, ...); it was aborted, so none of its outputs or offsets count and the
    task must read its records again from the last committed offsets."""


def transactional_id(app: App, task: str) -> str:
    """The task's ``transactional.id``: the same on every machine and after restarts."""
    return f"{app.id}-{task}"


def transactional_producer(app: App, bootstrap: str, task: str, client_id: str,
                           on_delivery: Callable[[Optional[KafkaError], Any], None]) -> Producer:
    return Producer({
        **app.producer_config(bootstrap),
        "client.id": f"{client_id}-{task}",
        "transactional.id": transactional_id(app, task),
        "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
        "on_delivery": on_delivery,
    })


class TaskTransaction:
    """The transactional producer of one task and whether a transaction is open."""

    def __init__(self, task: str, producer: Producer,
                 heartbeat: Callable[[], None] = lambda: None, topic: Optional[str] = None
                 ) -> None:
        self.task = task
        self.producer = producer
        #: a topic of the task: :meth:`init` asks for its metadata to connect (None: all)
        self.topic = topic
        #: called between the slices of a call that waits for the broker (the worker's
        #: heartbeat to the supervisor; a no-op in a thread)
        self.heartbeat = heartbeat
        self.open = False
        #: when the open transaction began (time.monotonic())
        self.began = 0.0

    def init(self) -> None:
        """Registers the id with the broker: fences an older producer of the task and
        aborts what it left open.  Waits out an unreachable broker (at most
        :data:`~.broker_wait.BROKER_WAIT` seconds).  Connected to a broker first
        (:mod:`.connect`: 0.5 s less)."""
        connect(self.producer, self.topic)
        self._call(self.producer.init_transactions, "initialising its transactions")

    def _call(self, call: Callable[[float], Any], what: str, limit: Optional[float] = None) -> Any:
        """``call(timeout)`` waiting out an unreachable broker with heartbeats (see
        :func:`~.broker_wait.call_while_unreachable`)."""
        return call_while_unreachable(call, self.heartbeat, f"task {self.task}: {what}", limit)

    def _flush(self, producer: Producer) -> None:
        """Waits for the delivery reports of everything produced in the transaction, in
        slices with heartbeats.  Records the broker does not acknowledge fail after
        ``message.timeout.ms`` (at most ``transaction.timeout.ms`` with transactions), and
        the commit then fails too; past :data:`~.broker_wait.BROKER_WAIT`: BrokerUnavailable."""
        deadline = time.monotonic() + broker_wait.BROKER_WAIT
        while producer.flush(BROKER_SLICE):
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(f"task {self.task}: outputs not acknowledged in "
                                        f"{broker_wait.BROKER_WAIT:.0f}s")
            self.heartbeat()

    def begin(self) -> Producer:
        """The producer, with a transaction open for whatever comes next."""
        if not self.open:
            self.producer.begin_transaction()
            self.open = True
            self.began = time.monotonic()
        return self.producer

    def commit(self, offsets: Dict[TopicPartitionKey, int], group_metadata: Any) -> None:
        """Commits the open transaction's outputs together with ``offsets`` (the next
        offsets to read).  Raises :class:`TransactionAborted` when the broker refused the
        transaction and it was aborted; a fatal error (fenced: the task has a new owner)
        propagates and ends the child.  An unreachable broker is waited out with
        heartbeats; past :data:`~.broker_wait.BROKER_WAIT` it raises BrokerUnavailable."""
        producer = self.begin()  # offsets alone are worth a transaction too
        try:
            # delivery reports first: they carry the changelog offsets that LMDB stores
            self._flush(producer)
            if offsets:
                tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
                self._call(lambda timeout: producer.send_offsets_to_transaction(
                    tps, group_metadata, timeout), "sending its offsets")
            # a commit that timed out is resumed by calling it again (librdkafka)
            self._call(producer.commit_transaction, "committing")
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if not error.txn_requires_abort():
                raise
            self.abort(limit=ABORT_WAIT)
            raise TransactionAborted(f"task {self.task}: transaction aborted: {error.str()}") from None
        self.open = False

    def abort(self, limit: Optional[float] = None) -> None:
        """Throws the open transaction away (its records never become visible), waiting
        out an unreachable broker for at most ``limit`` seconds."""
        if self.open:
            self._call(self.producer.abort_transaction, "aborting", limit)
            self.open = False

    def close(self) -> None:
        """Aborts what is open, briefly (:data:`CLOSE_WAIT`): a child that stops because
        the broker is away does not wait for it again."""
        try:
            self.abort(limit=CLOSE_WAIT)
        except KafkaException as exc:  # a fenced or broken producer has nothing to abort
            log.warning("task %s: abort on close failed: %s", self.task, exc.args[0].str())
        except BrokerUnavailable as exc:
            log.warning("%s; the broker aborts it after transaction.timeout.ms", exc)


class Transactions:
    """The :class:`TaskTransaction` of every task this child holds, found by task or by
    the topic-partition of a record."""

    def __init__(self, app: App, bootstrap: str, client_id: str,
                 on_delivery: Callable[[Optional[KafkaError], Any], None],
                 heartbeat: Callable[[], None] = lambda: None) -> None:
        self.app = app
        #: the worker's heartbeat to the supervisor, sent while a call waits for the broker
        self.heartbeat = heartbeat
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.on_delivery = on_delivery
        self.by_task: Dict[str, TaskTransaction] = {}
        self.by_partition: Dict[TopicPartitionKey, TaskTransaction] = {}
        #: the supervisor's ``consumer_group_metadata()``: who commits, in which generation
        self.group_metadata: Optional[bytes] = None

    def open(self, tasks: Iterable[str]) -> None:
        """Creates and initialises the producers of new tasks, one after another, in the
        order given.  Each ``init_transactions`` may abort what the task's previous owner
        left open (a killed child), and the test broker wedges when two such aborts on
        partitions both transactions wrote run at once: every later transaction there
        stays pending for good (DESIGN.md, "Tests and the broker").  On Kafka this costs a
        round trip to the coordinator per task.  Each init heartbeats while it waits, so
        an outage during an assignment is waited out like any other (BrokerUnavailable
        after :data:`~.broker_wait.BROKER_WAIT`)."""
        for task in tasks:
            if task in self.by_task:
                continue
            txn = TaskTransaction(task, transactional_producer(self.app, self.bootstrap, task,
                                                               self.client_id, self.on_delivery),
                                  self.heartbeat, self.app.topology.task_partitions(task)[0][0])
            txn.init()
            self.by_task[task] = txn
            for tp in self.app.topology.task_partitions(task):
                self.by_partition[tp] = txn

    def close(self, task: str) -> None:
        txn = self.by_task.pop(task, None)
        if txn is not None:
            self.by_partition = {k: v for k, v in self.by_partition.items() if v is not txn}
            txn.close()

    def close_all(self) -> None:
        for task in list(self.by_task):
            self.close(task)

    def for_partition(self, topic: str, partition: int) -> Producer:
        """The producer for the outputs of a record of ``topic[partition]``, its task's
        transaction begun."""
        return self.by_partition[(topic, partition)].begin()

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest open transaction has been open (0 when none is)."""
        return max((now - txn.began for txn in self.by_task.values() if txn.open), default=0.0)

    def for_task(self, task: str) -> Producer:
        return self.by_task[task].begin()
