"""The supervisor's seat in the group (supervisor/membership.py), with a stand-in for
librdkafka's Consumer: the configuration it joins with, the bookkeeping of its rebalance
callbacks, offsets, commit confirmations and the group state it reports.  No broker."""
from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

import shardworker
from supervisor import membership
from supervisor.membership import OFFSET_BEGINNING, OFFSET_END, GroupMember

pytestmark = pytest.mark.timeout(10)

Key = Tuple[str, int]


class FakeConsumer:
    """Records what the member asks of librdkafka; ``fail`` names calls that raise."""

    def __init__(self, config: Dict[str, Any]) -> None:
        self.config = config
        self.calls: List[Tuple[str, Any]] = []
        self.fail: set = set()
        self.offsets: Dict[Key, int] = {}      # the group's committed offsets
        self.confirm = True                    # the broker confirms asynchronous commits
        self.pending: List[List[TopicPartition]] = []
        self.poll_errors: List[KafkaError] = []
        self.metadata: Any = b""
        self.member = ""

    def _call(self, name: str, arg: Any = None) -> None:
        self.calls.append((name, arg))
        if name in self.fail:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, f"planted {name}"))

    @staticmethod
    def _keys(partitions: List[TopicPartition]) -> List[Key]:
        return [(tp.topic, tp.partition) for tp in partitions]

    def subscribe(self, topics: List[str], **callbacks: Any) -> None:
        self.calls.append(("subscribe", topics))
        self.callbacks = callbacks

    def incremental_assign(self, partitions: List[TopicPartition]) -> None:
        self._call("assign", self._keys(partitions))

    def incremental_unassign(self, partitions: List[TopicPartition]) -> None:
        self._call("unassign", self._keys(partitions))

    def pause(self, partitions: List[TopicPartition]) -> None:
        self._call("pause", self._keys(partitions))

    def committed(self, partitions: List[TopicPartition], timeout: float) -> List[TopicPartition]:
        self._call("committed", self._keys(partitions))
        return [TopicPartition(tp.topic, tp.partition, self.offsets.get((tp.topic, tp.partition), -1001))
                for tp in partitions]

    def commit(self, offsets: List[TopicPartition], asynchronous: bool) -> None:
        self._call("commit_async" if asynchronous else "commit",
                   {(tp.topic, tp.partition): tp.offset for tp in offsets})
        if asynchronous and self.confirm:
            self.pending.append(offsets)

    def poll(self, timeout: float) -> Any:
        for offsets in self.pending:
            self.config["on_commit"](None, offsets)  # librdkafka calls it from poll()
        self.pending = []
        if self.poll_errors:
            err = self.poll_errors.pop(0)
            return SimpleNamespace(error=lambda: err)
        return None

    def memberid(self) -> str:
        if "memberid" in self.fail:
            raise RuntimeError("consumer closed")
        return self.member

    def consumer_group_metadata(self) -> Any:
        return self.metadata


class Recorder:
    """The arbiter's side: records each callback's keys; may raise a KafkaException."""

    def __init__(self) -> None:
        self.seen: List[Tuple[str, List[Key]]] = []
        self.raise_on: Optional[str] = None

    def __call__(self, what: str):  # type: ignore[no-untyped-def]
        def callback(keys: List[Key]) -> None:
            self.seen.append((what, list(keys)))
            if self.raise_on == what:
                raise KafkaException(KafkaError(KafkaError._TRANSPORT, "planted"))
        return callback


@pytest.fixture
def made(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(membership, "Consumer", FakeConsumer)

    def make(**settings: Any) -> Tuple[GroupMember, FakeConsumer, Recorder]:
        app = shardworker.App("proj", **settings)
        arbiter = Recorder()
        member = GroupMember(app, "127.0.0.1:9", arbiter("assign"), arbiter("revoke"), arbiter("lost"))
        return member, member.consumer, arbiter  # type: ignore[return-value]

    return make


def tps(*keys: Key) -> List[TopicPartition]:
    return [TopicPartition(t, p) for t, p in keys]


def test_the_member_joins_cooperatively_reads_committed_and_never_commits_by_itself(made):
    member, consumer, _ = made(session_timeout_ms=6000)
    config = consumer.config
    assert config["group.id"] == "proj" and config["client.id"] == "proj-supervisor"
    assert config["bootstrap.servers"] == "127.0.0.1:9"
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    assert config["session.timeout.ms"] == 6000 and config["heartbeat.interval.ms"] == 600
    assert config["enable.auto.commit"] is False and config["enable.auto.offset.store"] is False
    assert config["isolation.level"] == "read_committed"
    assert config["auto.offset.reset"] == "earliest"
    assert made(session_timeout_ms=500)[1].config["heartbeat.interval.ms"] == 100  # a floor
    member.subscribe(("a", "b"))
    assert consumer.calls == [("subscribe", ["a", "b"])]
    assert set(consumer.callbacks) == {"on_assign", "on_revoke", "on_lost"}


def test_an_assignment_is_taken_paused_and_reported_even_when_empty(made):
    member, consumer, arbiter = made()
    member._assigned(consumer, tps(("in", 0), ("in", 1)))
    assert consumer.calls == [("assign", [("in", 0), ("in", 1)]), ("pause", [("in", 0), ("in", 1)])]
    member._assigned(consumer, [])  # the group was joined with nothing for us
    assert arbiter.seen == [("assign", [("in", 0), ("in", 1)]), ("assign", [])]
    assert member.assigned == [("in", 0), ("in", 1)] and member.rebalances == 2


def test_a_revoke_is_reported_before_the_partitions_are_given_back(made):
    member, consumer, arbiter = made()
    member._assigned(consumer, tps(("in", 0), ("in", 1), ("in", 2)))
    consumer.calls.clear()
    member._revoked(consumer, tps(("in", 1)))
    member._lost(consumer, tps(("in", 2)))
    assert arbiter.seen[1:] == [("revoke", [("in", 1)]), ("lost", [("in", 2)])]
    assert consumer.calls == [("unassign", [("in", 1)]), ("unassign", [("in", 2)])]
    assert member.assigned == [("in", 0)]
    member._revoked(consumer, [])  # nothing revoked: the arbiter is not bothered
    member._lost(consumer, [])
    assert len(arbiter.seen) == 3


def test_a_kafka_error_inside_a_rebalance_callback_is_logged_never_raised(made, caplog):
    member, consumer, arbiter = made()
    consumer.fail = {"assign", "unassign"}
    arbiter.raise_on = "assign"
    with caplog.at_level(logging.WARNING, logger="supervisor.membership"):
        member._assigned(consumer, tps(("in", 0)))
        arbiter.raise_on = "revoke"
        member._revoked(consumer, tps(("in", 0)))
    assert [w for w, _ in arbiter.seen] == ["assign", "revoke"]
    assert member.assigned == [] and member.rebalances == 1
    text = caplog.text
    assert "taking [('in', 0)]" in text and "handling the assign of" in text
    assert "handling the revoke of" in text and "giving back" in text


@pytest.mark.parametrize("reset,where", [("earliest", OFFSET_BEGINNING), ("latest", OFFSET_END)])
def test_start_offsets_are_the_committed_ones_or_where_the_reset_setting_says(made, reset, where):
    member, consumer, _ = made(auto_offset_reset=reset)
    consumer.offsets = {("in", 0): 42, ("in", 2): 0}
    got = member.start_offsets([("in", 0), ("in", 1), ("in", 2)])
    assert got == {("in", 0): 42, ("in", 1): where, ("in", 2): 0}
    consumer.fail = {"committed"}
    with pytest.raises(KafkaException):  # the caller tries again later
        member.start_offsets([("in", 0)])


def test_confirmed_commits_are_taken_once_and_failed_ones_are_not(made):
    member, consumer, _ = made()
    member.commit_soon({("in", 0): 10, ("in", 1): 5})
    assert member.take_acknowledged() == {}  # nothing confirmed before a poll
    member.poll()
    assert member.take_acknowledged() == {("in", 0): 10, ("in", 1): 5}
    assert member.take_acknowledged() == {}
    failed = SimpleNamespace(topic="in", partition=2, offset=7,  # TopicPartition.error is read-only
                             error=KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
    member._on_commit(None, [failed, TopicPartition("in", 3, -1001), TopicPartition("in", 4, 3)])
    member._on_commit(KafkaError(KafkaError._TRANSPORT), [TopicPartition("in", 5, 9)])
    assert member.take_acknowledged() == {("in", 4): 3}


def test_commit_within_waits_for_the_confirmation_and_gives_up_in_time(made):
    member, consumer, _ = made()
    assert member.commit_within({("in", 0): 10}, timeout=5.0) is True
    consumer.confirm = False  # the broker is away
    assert member.commit_within({("in", 0): 11}, timeout=0.2) is False
    consumer.fail = {"commit_async"}
    assert member.commit_within({("in", 0): 12}, timeout=0.1) is False  # logged, not raised
    consumer.fail = {"commit"}
    assert member.commit({("in", 0): 13}) is False
    consumer.fail = set()
    assert member.commit({("in", 0): 13}) is True
    assert ("commit", {("in", 0): 13}) in consumer.calls


def test_the_same_poll_error_is_logged_at_most_every_30_seconds(made, monkeypatch, caplog):
    member, consumer, _ = made()
    now = [1000.0]
    monkeypatch.setattr(membership, "time", SimpleNamespace(monotonic=lambda: now[0]))
    down = KafkaError(KafkaError._ALL_BROKERS_DOWN, "all brokers down")
    with caplog.at_level(logging.WARNING, logger="supervisor.membership"):
        for _ in range(4):  # every 10 s
            consumer.poll_errors.append(down)
            member.poll()
            now[0] += 10.0
        consumer.poll_errors.append(KafkaError(KafkaError._TRANSPORT, "another"))
        member.poll()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["group member: all brokers down", "group member: all brokers down",
                     "group member: another"]


def test_group_state_reads_the_generation_from_the_group_metadata(made):
    member, consumer, _ = made()
    assert member.group_state() == {"state": "joining", "generation": None, "member_id": None,
                                    "rebalances": 0}
    consumer.member = "rdkafka-1"
    consumer.metadata = b"CGMDv2:" + (7).to_bytes(4, "big") + b"rest"
    assert member.group_state() == {"state": "stable", "generation": 7, "member_id": "rdkafka-1",
                                    "rebalances": 0}
    consumer.metadata = b"CGMDv2:" + (-1).to_bytes(4, "big", signed=True)
    assert member.group_state()["state"] == "joining"
    consumer.metadata = b"CGMDv9:" + (7).to_bytes(4, "big")
    assert member.group_state()["generation"] is None
    consumer.fail = {"memberid"}
    assert member.group_state()["state"] == "joining"
