"""The worker's record path at least once, with a stand-in producer: steps 1-3 (decode,
agent, outputs) and 4-6 (acknowledged → offsets count), and what a failed delivery or a
bad record does to them.  No broker: the producer never connects."""
from __future__ import annotations

import contextlib
import json
import signal
from itertools import repeat
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
from confluent_kafka import KafkaError

from shardworker import App
from shardworker.committers import DeliveryFailed
from shardworker.worker import Worker
from tests.unit.fakes import Message


class SentToSupervisor:
    """The child's end of the channel: what it sent."""

    def __init__(self) -> None:
        self.sent: List[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)


class AckingProducer:
    """Takes records; ``flush`` acknowledges them all, or fails those ``failing`` names."""

    def __init__(self, failing: Callable[[str], bool] = lambda topic: False) -> None:
        self.records: List[Tuple[str, Any, Any]] = []
        self.headers: List[Any] = []
        self.timestamps: List[int] = []
        self.pending: List[Tuple[str, Optional[Callable[..., None]]]] = []
        self.failing = failing
        self.default_report: Optional[Callable[..., None]] = None

    def produce(self, topic: str, value: Any = None, key: Any = None, partition: int = -1,
                headers: Any = None, on_delivery: Optional[Callable[..., None]] = None,
                timestamp: int = 0) -> None:
        self.records.append((topic, key, value))
        self.headers.append(headers)
        self.timestamps.append(timestamp)
        self.pending.append((topic, on_delivery))

    def flush(self, timeout: float = 0) -> int:
        for topic, report in self.pending:
            error = KafkaError(KafkaError._MSG_TIMED_OUT) if self.failing(topic) else None
            callback = report or self.default_report
            if callback is not None and error is not None:
                callback(error, Message(topic, 0, -1))
        self.pending = []
        return 0

    def poll(self, timeout: float = 0) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.pending)


@pytest.fixture
def worker() -> Iterator[Worker]:
    """A set-up worker of an app that doubles ``n`` from ``in`` to ``out`` (dead letters
    for bad records), its producer replaced by an :class:`AckingProducer`."""
    app = App("u", broker="kafka://127.0.0.1:9")
    source, sink = app.topic("in"), app.topic("out")

    @app.agent(source, sink=[sink])
    def double(stream):  # type: ignore[no-untyped-def]
        for value in stream:
            yield {"n": value["n"] * 2}

    with running(app) as started:
        yield started


@contextlib.contextmanager
def running(app: App) -> Iterator[Worker]:
    """A set-up worker of ``app``, its producer replaced by an :class:`AckingProducer`."""
    previous = signal.getsignal(signal.SIGTERM)
    worker = Worker(app, channel=SentToSupervisor(), bootstrap="127.0.0.1:9", index=0)  # type: ignore[arg-type]
    worker.setup()
    producer = AckingProducer()
    producer.default_report = worker.committer.on_delivery
    worker.committer.producer = producer  # type: ignore[attr-defined]
    try:
        yield worker
    finally:
        worker.ticker.stop()  # type: ignore[union-attr]
        for runner in worker.runners:
            runner.stop()
        worker.consumer.close()
        signal.signal(signal.SIGTERM, previous)


def records(*values: bytes) -> List[Message]:
    return [Message("in", 0, offset, value, key=b"k%d" % offset) for offset, value in enumerate(values)]


@pytest.mark.timeout(20)
def test_a_batch_counts_once_its_outputs_are_acknowledged(worker: Worker) -> None:
    producer = worker.committer.producer  # type: ignore[attr-defined]
    worker.process_chunk(records(b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'))
    assert [(t, k, json.loads(v)) for t, k, v in producer.records] == [
        ("out", b"k0", {"n": 2}), ("out", b"k1", {"n": 4}), ("out", b"k2", {"n": 6})]
    assert worker.positions == {} and worker.processed == 3  # processed, not settled
    worker.settle(block=True)
    assert worker.positions == {("in", 0): 3} and worker.unsettled == []


@pytest.mark.timeout(20)
def test_a_failed_delivery_keeps_the_batch_from_counting(worker: Worker) -> None:
    producer = worker.committer.producer  # type: ignore[attr-defined]
    producer.failing = lambda topic: topic == "out"
    worker.process_chunk(records(b'{"n": 1}'))
    with pytest.raises(Exception) as raised:
        worker.settle(block=True)
    # every error says the broker was not reached: an outage, not a refusal
    assert type(raised.value).__name__ == "BrokerUnavailable"
    assert worker.positions == {}


@pytest.mark.timeout(20)
def test_a_refused_delivery_is_a_failed_batch(worker: Worker) -> None:
    worker._delivery_errors.append("out: Broker: Topic authorization failed")
    worker.process_chunk(records(b'{"n": 1}'))
    with pytest.raises(DeliveryFailed):
        worker.settle(block=True)
    assert worker.positions == {}


@pytest.mark.timeout(20)
def test_a_bad_record_is_dead_lettered_and_its_offset_still_counts(worker: Worker) -> None:
    producer = worker.committer.producer  # type: ignore[attr-defined]
    worker.process_chunk(records(b'{"n": 1}', b"not json", b'{"n": 3}'))
    # records are decoded first (the bad one is dead-lettered then), then the agent runs
    assert [t for t, _k, _v in producer.records] == ["u-double-dlq", "out", "out"]
    assert producer.records[0][2] == b"not json" and worker.errors == 1
    worker.settle(block=True)
    assert worker.positions == {("in", 0): 3}


@pytest.mark.timeout(20)
def test_a_re_keying_agent_forwards_its_source_and_runs_its_loop_on_the_repartition_topic():
    """``group_by``: records of the source topic are forwarded (new key, value bytes as
    they were, their origin in a header) and never reach the loop; the loop takes the
    repartition topic's records, keyed by the new key."""
    from shardworker.origins import origin_of

    app = App("u", broker="kafka://127.0.0.1:9")
    orders, out = app.topic("orders"), app.topic("out")
    seen: List[Any] = []

    @app.agent(orders, sink=[out])
    def per_user(stream):  # type: ignore[no-untyped-def]
        for key, order in stream.group_by("user", name="by-user").items():
            seen.append((key, order["n"]))
            yield order["n"]

    with running(app) as worker:
        producer = worker.committer.producer  # type: ignore[attr-defined]
        value = b'{"user": "ann", "n": 7}'
        worker.process_chunk([Message("orders", 2, 40, value, key=b"order-1")])
        assert seen == []
        assert producer.records == [("u-by-user-repartition", b"ann", value)]
        assert origin_of(producer.headers[0]) == ("per_user|orders|2", (40, 0))
        assert producer.timestamps[0] == 1_767_225_600_000  # event time goes on with it
        worker.process_chunk([Message("u-by-user-repartition", 1, 0, value, key=b"ann",
                                      headers=producer.headers[0])])
        assert seen == [("ann", 7)]
        assert producer.records[1][:2] == ("out", b"ann")  # outputs keyed by the new key
        assert app.topology.task_id("u-by-user-repartition", 1) == "1_1"
        # a record that cannot be decoded, or whose key function raises, is dead-lettered
        worker.process_chunk([Message("orders", 2, 41, b"{not json", key=b"order-2"),
                              Message("orders", 2, 42, b'{"n": 1}', key=b"order-3")])
        assert [r[:2] for r in producer.records[2:]] == [("u-per_user-dlq", b"order-2"),
                                                         ("u-per_user-dlq", b"order-3")]
        assert worker.errors == 2 and seen == [("ann", 7)]


class DrainingState:
    """Stands in for the tasks' tables: records what each drain takes."""

    enabled = True

    def __init__(self) -> None:
        self.drains: List[Any] = []
        self.committed: List[Any] = []
        self.by_partition: dict = {}

    def tables_for(self, sources: Any) -> Any:
        return repeat(None)  # the records enter no tables

    def drain(self, positions: Any) -> List[Any]:
        self.drains.append(dict(positions))
        return [("changes of", dict(positions))]

    def dirty_keys(self) -> int:
        return 1

    def commit(self, changes: Any) -> None:
        self.committed.append(changes)


@pytest.mark.timeout(20)
def test_tables_drain_each_interval_and_at_once_when_a_poll_finds_nothing(worker, monkeypatch):
    """At least once, a task's table changes wait for ``commit_interval`` while records
    keep coming, and are drained (changelog, LMDB, offsets) as soon as the child has
    caught up: the end of a burst is not held back an interval."""
    now = [1000.0]
    monkeypatch.setattr("shardworker.worker.time.monotonic", lambda: now[0])
    state = DrainingState()
    worker.state = state  # type: ignore[assignment]
    worker._last_drain = worker._last_stats = now[0] + 10  # heartbeats with stats: not here
    now[0] += 10
    worker.process_chunk(records(b'{"n": 1}', b'{"n": 2}'))
    worker.settle(block=False)
    assert state.drains == [] and worker.positions == {}  # within the interval: kept
    now[0] += worker.drain_interval
    worker.process_chunk(records(b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'))
    assert state.drains == [{("in", 0): 3}]  # the interval is over: drained with the chunk
    now[0] += 0.01
    worker.process_chunk([Message("in", 0, 3, b'{"n": 4}', key=b"k3")])
    worker.settle(block=False)
    assert len(state.drains) == 1  # records still coming: the interval holds
    worker.settle(block=False, caught_up=True)
    assert state.drains[-1] == {("in", 0): 4}
    worker.settle(block=True)  # the stand-in producer acknowledges on flush
    assert worker.positions == {("in", 0): 4} and len(state.committed) == 2


class RecordingConsumer:
    """Stands in for the child's consumer: returns nothing, notes each wait."""

    def __init__(self) -> None:
        self.waits: List[float] = []

    def consume(self, count: int, timeout: float) -> List[Any]:
        self.waits.append(timeout)
        return []


@pytest.mark.timeout(20)
def test_a_poll_waits_briefly_while_table_changes_wait_to_be_drained(worker, monkeypatch):
    from shardworker.worker import CAUGHT_UP_WAIT, POLL_WAIT

    consumer = RecordingConsumer()
    monkeypatch.setattr(worker, "consumer", consumer)
    assert worker.poll() is None and consumer.waits == []  # nothing assigned: no poll
    worker.positions[("in", 0)] = 0
    worker.poll()
    worker.undrained[("in", 0)] = 3
    worker.poll()
    assert consumer.waits == [POLL_WAIT, CAUGHT_UP_WAIT] and CAUGHT_UP_WAIT < POLL_WAIT
