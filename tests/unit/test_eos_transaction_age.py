"""Exactly-once transactions stay inside ``transaction.timeout.ms`` (issue 11, point 8):
a fake clock drives the worker's commit decisions, so nothing here depends on speed."""
from __future__ import annotations

import time
from typing import Any, Dict, List

import pytest

from shardworker import App
from shardworker.committers import ExactlyOnce
from shardworker.transactions import (COMMIT_BEFORE, TRANSACTION_TIMEOUT_MS, TaskTransaction,
                                      Transactions)
from shardworker.worker import Worker
from tests.unit.fakes import Message, RecordingProducer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


def eos_worker(commit_interval: float, consumer: Any = None, state: Any = None) -> Worker:
    """A worker with one task (0_0 of topic ``in``) whose producer records its calls, its
    committer exactly-once (the real one), its consumer and state stubs."""
    app = App("u", processing_guarantee="exactly_once", commit_interval=commit_interval)
    source = app.topic("in")

    @app.agent(source)
    def agent(stream):  # pragma: no cover - process_chunk is replaced in these tests
        yield from stream

    worker = Worker(app, channel=None, bootstrap="127.0.0.1:9", index=0)  # type: ignore[arg-type]
    worker.consumer = consumer if consumer is not None else Stub()  # type: ignore[assignment]
    worker.state = state if state is not None else Stub()  # type: ignore[assignment]
    committer = ExactlyOnce(app, "127.0.0.1:9", "c", worker._delivery_errors, worker.heartbeat,
                            worker.consumer, worker.state, worker.positions)
    txn = TaskTransaction("0_0", RecordingProducer())  # type: ignore[arg-type]
    committer.transactions.by_task["0_0"] = txn
    committer.transactions.by_partition[("in", 0)] = txn
    committer._last_commit = time.monotonic()
    worker.committer = committer
    worker.transactions = committer.transactions  # type: ignore[attr-defined]  # short for the tests
    return worker


def slow_chunks(worker: Worker, clock: Clock, done: List[int]) -> Any:
    """Stands in for ``worker.process_chunk``: one second (of ``clock``) per record, each
    in its task's transaction; the offsets processed go to ``done``."""
    def slow_chunk(records: List[Message]) -> None:
        positions = {}
        for msg in records:
            worker.transactions.for_partition(msg.topic(), msg.partition())  # type: ignore[union-attr]
            clock.now += 1.0
            done.append(msg.offset())
            positions[(msg.topic(), msg.partition())] = msg.offset() + 1
        worker.unsettled.append((clock.now, positions, []))

    return slow_chunk


def test_an_open_transaction_commits_at_half_the_timeout_whatever_the_interval(clock):
    worker = eos_worker(commit_interval=3600.0)
    txn = worker.transactions.by_task["0_0"]  # type: ignore[union-attr]
    txn.begin()
    worker.unsettled.append((clock.now, {("in", 0): 5}, []))
    clock.now += COMMIT_BEFORE - 0.5
    worker.settle(block=False)
    assert txn.open and "commit" not in txn.producer.calls  # type: ignore[attr-defined]
    clock.now += 0.5
    worker.settle(block=False)
    assert not txn.open and txn.producer.calls.count("commit") == 1  # type: ignore[attr-defined]
    assert txn.producer.offsets == [("in", 0, 5)]  # type: ignore[attr-defined]
    assert COMMIT_BEFORE < TRANSACTION_TIMEOUT_MS / 1000


def test_a_batch_of_slow_records_commits_in_chunks_inside_the_timeout(clock, monkeypatch):
    worker = eos_worker(commit_interval=3600.0)  # only the age of a transaction commits
    ages: List[float] = []
    commit = TaskTransaction.commit

    def timed_commit(self: TaskTransaction, offsets: Dict[Any, int], metadata: Any) -> None:
        ages.append(clock.now - self.began)
        commit(self, offsets, metadata)

    monkeypatch.setattr(TaskTransaction, "commit", timed_commit)
    done: List[int] = []
    monkeypatch.setattr(worker, "process_chunk", slow_chunks(worker, clock, done))
    worker.process([Message("in", 0, n) for n in range(30)])
    assert done == list(range(30))
    assert len(ages) >= 4 and max(ages) <= COMMIT_BEFORE + 1.0, ages
    worker.settle(block=True)
    producer = worker.transactions.by_task["0_0"].producer  # type: ignore[union-attr]
    assert producer.offsets == [("in", 0, 30)]


def test_chunks_grow_back_to_the_batch_for_fast_records(clock):
    worker = eos_worker(commit_interval=0.1)
    committer = worker.committer
    for _ in range(8):
        committer._size_chunks(committer._chunk, elapsed=committer._chunk * 1e-5)
    assert committer._chunk == worker.batch_size
    committer._size_chunks(committer._chunk, elapsed=committer._chunk * 1.0)  # records slowed down
    assert committer._chunk == 1


class Stub:
    """Records the calls made on it (a consumer's re-assignment, a state's abort)."""

    def __init__(self) -> None:
        self.calls: List[str] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self.calls.append(name)


def test_records_of_a_task_whose_transaction_aborted_mid_batch_are_left_for_the_reread(
        clock, monkeypatch):
    from tests.unit.fakes import error

    worker = eos_worker(commit_interval=3600.0)
    txn = worker.transactions.by_task["0_0"]  # type: ignore[union-attr]
    txn.producer = RecordingProducer({"commit": [error(txn_requires_abort=True)]})
    worker.positions[("in", 0)] = 0
    done: List[int] = []
    monkeypatch.setattr(worker, "process_chunk", slow_chunks(worker, clock, done))
    worker.process([Message("in", 0, n) for n in range(30)])
    # the first commit (at about COMMIT_BEFORE) was aborted: the rest of the batch waits
    # for the re-read from offset 0 instead of being processed (and committed) now
    assert done == list(range(len(done))) and len(done) < 30
    assert worker.consumer.calls == ["incremental_unassign", "incremental_assign"]  # type: ignore[attr-defined]
    assert worker.state.calls == ["abort"]  # type: ignore[attr-defined]


class RestoringState:
    """Stands in for TaskStates: records, at each restore, whether a transaction was open."""

    enabled = True

    def __init__(self, transactions: Transactions) -> None:
        self.transactions = transactions
        self.open_during_restore: List[bool] = []

    def holds_tables(self, task: str) -> bool:
        return True

    def open(self, task: str, starts: Dict[Any, int], **kwargs: Any) -> Dict[Any, int]:
        self.open_during_restore.append(
            any(txn.open for txn in self.transactions.by_task.values()))
        return starts

    def drain(self, positions: Any) -> List[Any]:
        return []

    def commit(self, batches: List[Any]) -> None:
        pass


class CommittedConsumer(Stub):
    """A consumer stub whose group has committed offset 7 for every partition."""

    def committed(self, tps: List[Any], timeout: float) -> List[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition(tp.topic, tp.partition, 7) for tp in tps]


def test_no_transaction_is_open_while_a_new_task_restores(clock, monkeypatch):
    """A child holding task 0_0 with a transaction open is assigned 0_1, whose tables
    restore (maybe for longer than transaction.timeout.ms): 0_0 commits first."""
    worker = eos_worker(commit_interval=3600.0, consumer=CommittedConsumer())
    transactions = worker.transactions
    worker.state = worker.committer.state = RestoringState(transactions)  # type: ignore
    held = transactions.by_task["0_0"]
    held.begin()
    worker.positions[("in", 0)] = 3
    worker.unsettled.append((clock.now, {("in", 0): 5}, []))
    new = TaskTransaction("0_1", RecordingProducer())  # type: ignore[arg-type]

    def open_tasks(tasks: Any) -> None:  # init_transactions of the new task, no broker
        transactions.by_task["0_1"] = new
        transactions.by_partition[("in", 1)] = new

    monkeypatch.setattr(transactions, "open", open_tasks)
    worker.channel = Stub()  # type: ignore[assignment]
    worker.assign([["in", 1, 0]])
    assert worker.state.open_during_restore == [False]  # type: ignore[attr-defined]
    assert held.producer.calls[-1] == "commit" and held.producer.offsets == [("in", 0, 5)]  # type: ignore[attr-defined]
    assert worker.positions[("in", 1)] == 7  # the group's committed offset, not the given 0


class AwayConsumer:
    """A consumer whose committed() times out ``failures`` times (the broker stopped),
    then answers offset 7 for every partition."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def committed(self, tps: List[Any], timeout: float) -> List[Any]:
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        self.calls += 1
        if self.calls <= self.failures:
            time.sleep(timeout)
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "planted", retriable=True))
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in tps]


def test_the_committed_offsets_are_read_through_an_outage_with_heartbeats(monkeypatch):
    """Issue 11, point 7: the start offsets of newly assigned tasks are read again while
    the broker is away, with heartbeats (before: one 30 s call, no heartbeat, so the
    supervisor killed the child as hung); past BROKER_WAIT: BrokerUnavailable (exit 75)."""
    from shardworker import broker_wait
    from shardworker.broker_wait import BrokerUnavailable

    monkeypatch.setattr(broker_wait, "BROKER_SLICE", 0.01)
    monkeypatch.setattr(broker_wait, "BROKER_CALL_TIMEOUT", 0.01)
    committer = eos_worker(commit_interval=3600.0).committer
    monkeypatch.setattr(committer.transactions, "open", lambda tasks: None)
    beats: List[int] = []
    committer.heartbeat = lambda: beats.append(1)
    committer.consumer = AwayConsumer(failures=3)
    assert committer.starts([["in", 0, 2]], lambda: None) == [["in", 0, 7]]
    assert committer.consumer.calls == 4 and len(beats) >= 3

    monkeypatch.setattr(broker_wait, "BROKER_WAIT", 0.1)
    committer.consumer = AwayConsumer(failures=10_000)
    with pytest.raises(BrokerUnavailable, match="committed offsets"):
        committer.starts([["in", 0, 2]], lambda: None)
