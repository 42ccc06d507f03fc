"""Exactly-once: one transactional producer per task (Kafka's KIP-98 and KIP-447).

Under ``processing_guarantee="exactly_once"`` every output of a task (sink records, dead
letters, ``topic.send()`` from the agent, changelog records) goes into that task's open
transaction, and the task's input offsets are committed in the same transaction with the
group metadata of the supervisor (the group member; the child reads with ``assign()``).
Either all of it becomes visible to ``read_committed`` consumers, or none of it does.

``transactional.id`` is ``<app id>-<task>``: stable across restarts and machines, so a new
owner of a task fences the previous one (a zombie child can no longer commit), and its
``init_transactions()`` aborts whatever the previous owner left open.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, Optional

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from .app import App
from .topology import TopicPartitionKey, task_partitions

log = logging.getLogger("shardworker.transactions")

#: how long the broker keeps a transaction open without a word from its producer; after
#: a crash whose task is not taken over this bounds how long read_committed readers wait
TRANSACTION_TIMEOUT_MS = 10_000
#: seconds after which an open transaction commits whatever the commit interval: half the
#: timeout, so a slow batch or a slow broker still commits well before the broker aborts
#: the transaction (and fences the task's producer)
COMMIT_BEFORE = TRANSACTION_TIMEOUT_MS / 1000 / 2
#: seconds one transactional call may take before the task gives up on its transaction
CALL_TIMEOUT = 30.0
#: a retriable commit is retried this many times before the task gives up
COMMIT_ATTEMPTS = 5


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

    def __init__(self, task: str, producer: Producer) -> None:
        self.task = task
        self.producer = producer
        self.open = False
        #: when the open transaction began (time.monotonic())
        self.began = 0.0

    def init(self) -> None:
        """Registers the id with the broker: fences an older producer of the task and
        aborts what it left open."""
        self.producer.init_transactions(CALL_TIMEOUT)

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
        propagates and ends the child."""
        producer = self.begin()  # offsets alone are worth a transaction too
        try:
            # delivery reports first: they carry the changelog offsets that LMDB stores
            producer.flush(CALL_TIMEOUT)
            if offsets:
                producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    group_metadata, CALL_TIMEOUT)
            for attempt in range(COMMIT_ATTEMPTS):
                try:
                    producer.commit_transaction(CALL_TIMEOUT)
                    break
                except KafkaException as exc:
                    if not exc.args[0].retriable() or attempt == COMMIT_ATTEMPTS - 1:
                        raise
                    time.sleep(0.1 * (attempt + 1))
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if not error.txn_requires_abort():
                raise
            self.abort()
            raise TransactionAborted(f"task {self.task}: transaction aborted: {error.str()}") from None
        self.open = False

    def abort(self) -> None:
        """Throws the open transaction away (its records never become visible)."""
        if self.open:
            self.producer.abort_transaction(CALL_TIMEOUT)
            self.open = False

    def close(self) -> None:
        try:
            self.abort()
        except KafkaException as exc:  # a fenced or broken producer has nothing to abort
            log.warning("task %s: abort on close failed: %s", self.task, exc.args[0].str())


class Transactions:
    """The :class:`TaskTransaction` of every task this child holds, found by task or by
    the topic-partition of a record."""

    def __init__(self, app: App, bootstrap: str, client_id: str,
                 on_delivery: Callable[[Optional[KafkaError], Any], None]) -> None:
        self.app = app
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.on_delivery = on_delivery
        self.by_task: Dict[str, TaskTransaction] = {}
        self.by_partition: Dict[TopicPartitionKey, TaskTransaction] = {}
        #: the supervisor's ``consumer_group_metadata()``: who commits, in which generation
        self.group_metadata: Optional[bytes] = None

    def open(self, tasks: Iterable[str]) -> None:
        """Creates and initialises the producers of new tasks (concurrently: each
        ``init_transactions`` is a round trip or more to the transaction coordinator)."""
        new = [TaskTransaction(task, transactional_producer(self.app, self.bootstrap, task,
                                                            self.client_id, self.on_delivery))
               for task in tasks if task not in self.by_task]
        if len(new) > 1:
            with ThreadPoolExecutor(len(new)) as pool:
                list(pool.map(TaskTransaction.init, new))
        elif new:
            new[0].init()
        for txn in new:
            self.by_task[txn.task] = txn
            for tp in task_partitions(self.app.source_topics, txn.task):
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
