"""Unit tests of the start-up path's waits (docs/benchmark.md, "Startup"): the restore
consumer returns at a changelog's end instead of waiting out its timeout and reads a
task's tables together, a child learns the partitions' leaders before assigning them at a
logical offset, new producers connect before they need a producer id, the supervisor asks
the broker through one admin client, turns its loop quickly until the group's first
assignment and starts its first child ahead of it."""
from __future__ import annotations

import signal
from collections import deque
from types import SimpleNamespace
from typing import Any, List, Optional

import pytest
from confluent_kafka import OFFSET_END, KafkaError, KafkaException

import supervisor.broker as broker
from shardworker.app import App
from shardworker.changelog import HDR_SRC_CONFIRMED, HDR_SRC_OFFSET, HDR_SRC_PARTITION, HDR_SRC_TOPIC
from shardworker.committers import AtLeastOnce
from shardworker.connect import connect
from shardworker.restore import Restorer, fetched
from shardworker.worker import Worker
from supervisor.arbiter import JOIN_TURN, Arbiter

from .fakes import Message
from .test_slots_and_rebalance import keys, live_slot, make


class End(Message):
    """librdkafka's end-of-partition event (``enable.partition.eof``)."""

    def __init__(self, topic: str, partition: int) -> None:
        super().__init__(topic, partition, -1)

    def error(self) -> KafkaError:  # type: ignore[override]
        return KafkaError(KafkaError._PARTITION_EOF)


class RestoreConsumer:
    """The restore consumer: ``ready`` is what it holds now (``consume`` takes it without
    waiting), ``later`` what arrives while ``poll`` waits, one at a time."""

    def __init__(self, ready: List[Any] = (), later: List[Any] = ()) -> None:  # type: ignore[assignment]
        self.ready = deque(ready)
        self.later = deque(later)
        self.timeouts: List[float] = []
        self.assigned: List[List[Any]] = []

    def consume(self, count: int, timeout: float) -> List[Any]:
        self.timeouts.append(timeout)
        taken = [self.ready.popleft() for _ in range(min(count, len(self.ready)))]
        return taken

    def poll(self, timeout: float) -> Optional[Any]:
        return self.later.popleft() if self.later else None

    def assign(self, partitions: List[Any]) -> None:
        self.assigned.append(partitions)

    def unassign(self) -> None:
        pass


def restorer_with(consumer: RestoreConsumer) -> Restorer:
    restorer = Restorer(App("u", broker="kafka://127.0.0.1:9"), {}, heartbeat=lambda: None)
    restorer._restore_consumer = consumer  # type: ignore[assignment]
    return restorer


def test_a_fetch_takes_what_is_there_without_waiting_and_else_waits_for_one_event():
    a, b, end = Message("c", 0, 0), Message("c", 0, 1), End("c", 0)
    consumer = RestoreConsumer(ready=[a, b], later=[end])
    assert fetched(consumer) == [a, b]  # type: ignore[arg-type]
    assert fetched(consumer) == [end]  # type: ignore[arg-type]  # the end: no timeout waited
    assert fetched(consumer) == []  # type: ignore[arg-type]
    assert consumer.timeouts == [0, 0, 0]


def test_a_changelog_read_of_two_partitions_ends_when_both_ended():
    a, b, late = Message("x", 3, 0), Message("y", 3, 0), Message("y", 3, 9)
    consumer = RestoreConsumer(later=[a, End("x", 3), End("x", 3), b, End("y", 3), late])
    read = [key for key, _v, _h in restorer_with(consumer)._changelog(consumer, [], partitions=2)]  # type: ignore[arg-type]
    assert len(read) == 2
    assert list(consumer.later) == [late]  # nothing read past the second end


def confirmed(topic: str, partition: int, offset: int, upto: int) -> Message:
    return Message(f"{topic}-changelog", 1, offset, b"v", key=b"k", headers=[
        (HDR_SRC_TOPIC, b"in"), (HDR_SRC_PARTITION, b"1"), (HDR_SRC_OFFSET, str(upto).encode()),
        (HDR_SRC_CONFIRMED, str(upto).encode())])


def test_the_confirmed_positions_read_every_table_of_the_task_at_once():
    tables = [SimpleNamespace(name=n, changelog_topic=f"{n}-changelog") for n in ("a", "b")]
    consumer = RestoreConsumer(later=[confirmed("a", 1, 0, 7), End("a-changelog", 1),
                                      confirmed("b", 1, 0, 9), End("b-changelog", 1)])
    found = restorer_with(consumer)._confirmed_positions(tables, {("in", 1): -2})  # type: ignore[arg-type]
    assert found == {("in", 1): 9}
    assert len(consumer.assigned) == 1
    # from the start: offset 0, not OFFSET_BEGINNING (test_beginning.py)
    assert [(tp.topic, tp.partition, tp.offset) for tp in consumer.assigned[0]] == [
        ("a-changelog", 1, 0), ("b-changelog", 1, 0)]


class WorkerConsumer:
    """The child's consumer: records metadata requests and assignments."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: List[Any] = []
        self.fail = fail

    def list_topics(self, topic: str, timeout: float) -> None:
        self.calls.append(("metadata", topic))
        if self.fail:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    def incremental_assign(self, partitions: List[Any]) -> None:
        self.calls.append(("assign", [(tp.topic, tp.partition, tp.offset) for tp in partitions]))


def assigning_worker(consumer: WorkerConsumer) -> Worker:
    """A worker with what ``assign`` reads: a stateless app, a committer that keeps the
    given offsets."""
    app = App("u", broker="kafka://127.0.0.1:9")

    @app.agent(app.topic("in"))
    def noop(stream):  # type: ignore[no-untyped-def]
        for _value in stream:
            pass

    worker = Worker.__new__(Worker)
    worker.app, worker.topology = app, app.topology
    worker.consumer = consumer
    worker.committer = SimpleNamespace(starts=lambda parts, settle_all: parts)  # type: ignore[assignment]
    worker.state = SimpleNamespace(enabled=False)  # type: ignore[assignment]
    worker.positions = {}
    return worker


@pytest.mark.parametrize("offset, asks", [(OFFSET_END, True), (42, False)])
def test_leaders_are_asked_for_before_an_assign_at_a_logical_offset_only(offset, asks):
    """(The beginning is assigned as offset 0: shardworker/beginning.py.)"""
    consumer = WorkerConsumer()
    assigning_worker(consumer).assign([["in", 0, offset], ["in", 1, offset]])
    expected = [("metadata", "in")] if asks else []
    assert consumer.calls == expected + [("assign", [("in", 0, offset), ("in", 1, offset)])]


def test_an_assign_goes_on_when_the_leaders_cannot_be_asked_for():
    consumer = WorkerConsumer(fail=True)
    assigning_worker(consumer).assign([["in", 0, OFFSET_END]])
    assert consumer.calls[-1] == ("assign", [("in", 0, OFFSET_END)])


def test_every_client_connects_without_the_default_50_ms_spacing_unless_the_app_says():
    assert App("u").kafka_config("b:9")["reconnect.backoff.ms"] == 20
    own = App("u", kafka_config={"reconnect.backoff.ms": 100})
    assert own.kafka_config("b:9")["reconnect.backoff.ms"] == 100


def test_the_start_up_checks_ask_through_one_admin_client(monkeypatch):
    made = []

    class Admin:
        topics = {"in": SimpleNamespace(topic="in", partitions={0: None, 1: None})}

        def list_topics(self, timeout: float) -> Any:
            return SimpleNamespace(cluster_id="c1", topics=dict(self.topics))

        def create_topics(self, new: List[Any], request_timeout: float) -> Any:
            for topic in new:  # the dead-letter topic
                self.topics[topic.topic] = SimpleNamespace(topic=topic.topic, partitions={0: None})
            return {topic.topic: SimpleNamespace(result=lambda: None) for topic in new}

    def admin_client(app: App, bootstrap: str) -> Admin:
        made.append(bootstrap)
        return Admin()

    monkeypatch.setattr(broker, "admin_client", admin_client)
    app = App("u", broker="kafka://127.0.0.1:9")

    @app.agent(app.topic("in", partitions=2))
    def noop(stream):  # type: ignore[no-untyped-def]
        for _value in stream:
            pass

    assert broker.check_broker_and_topics(app, "b:9") == ("c1", {"in": 2, "u-noop-dlq": 1})
    assert made == ["b:9"]


def test_the_supervisor_loop_turns_quickly_only_until_the_group_assigned(tmp_path):
    app = App("u", broker="kafka://127.0.0.1:9")
    arbiter = Arbiter(app, "u", 1, "kafka://127.0.0.1:9", str(tmp_path))
    slept: List[float] = []
    arbiter.sleep = slept.append  # type: ignore[assignment]
    arbiter.member = SimpleNamespace(poll=lambda: None, take_acknowledged=dict)  # type: ignore[assignment]
    arbiter.loop_once()
    arbiter.assignment.joined = True
    arbiter.loop_once()
    assert slept == [JOIN_TURN, 0.1]


def test_a_child_started_ahead_takes_the_first_tasks_with_the_group_metadata_first():
    assignment, host = make("exactly_once")
    host.slots[0] = live_slot(0, [])
    assignment.on_assign(keys(0, 1, 2))
    ahead = host.slots[0]
    assert ahead.tasks == ["0_0", "0_2"] and host.spawned == [1]
    assert ahead.channel.ops() == ["group", "assign"]  # type: ignore[union-attr]


def test_a_child_started_ahead_stops_when_the_group_gives_this_supervisor_nothing():
    assignment, host = make()
    host.slots[0] = live_slot(0, [])
    assignment.on_assign([])
    assert host.slots[0].retiring and host.slots[0].signals == [signal.SIGTERM]  # type: ignore[attr-defined]


def test_a_child_started_ahead_waits_for_tasks_whose_start_offsets_are_late():
    assignment, host = make()
    host.slots[0] = live_slot(0, [])
    host.member.down = True  # type: ignore[union-attr]
    assignment.on_assign(keys(0))
    assert not host.slots[0].retiring
    host.member.down = False  # type: ignore[union-attr]
    assignment.next_placement = 0.0
    assignment.place_unplaced()
    assert host.slots[0].tasks == ["0_0"] and host.spawned == []


def test_children_started_ahead_that_late_tasks_leave_without_work_stop():
    assignment, host = make(max_children=3)
    for index in range(3):
        host.slots[index] = live_slot(index, [])
    host.member.down = True  # type: ignore[union-attr]
    assignment.on_assign(keys(0, 1))             # start offsets late: nothing placed yet
    assert not any(s.retiring for s in host.slots.values())
    host.member.down = False  # type: ignore[union-attr]
    assignment.next_placement = 0.0
    assignment.place_unplaced()
    assert [host.slots[i].tasks for i in (0, 1)] == [["0_0"], ["0_1"]]
    assert host.slots[2].tasks == [] and host.slots[2].retiring
    assert not host.slots[0].retiring and not host.slots[1].retiring and host.spawned == []


class MetadataClient:
    """A producer's metadata requests: answered, or failing (the broker away)."""

    def __init__(self, fail: bool = False) -> None:
        self.asked: List[Optional[str]] = []
        self.fail = fail

    def list_topics(self, topic: Optional[str] = None, timeout: float = -1) -> None:
        self.asked.append(topic)
        if self.fail:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))


def test_connecting_asks_twice_and_leaves_an_unreachable_broker_to_later_calls():
    client = MetadataClient()
    connect(client, "in")
    assert client.asked == ["in", "in"]
    away = MetadataClient(fail=True)
    connect(away, "in")  # does not raise
    assert away.asked == ["in"]


def test_an_at_least_once_producer_is_connected_at_the_first_assign_only():
    committer = AtLeastOnce.__new__(AtLeastOnce)
    committer.producer = MetadataClient()  # type: ignore[assignment]
    committer._connected = False
    assert committer.starts([], lambda: None) == []
    assert committer.starts([["in", 0, -2]], lambda: None) == [["in", 0, -2]]
    committer.starts([["in", 1, 5]], lambda: None)
    assert committer.producer.asked == ["in", "in"]  # type: ignore[attr-defined]
