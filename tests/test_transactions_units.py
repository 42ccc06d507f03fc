"""Exactly-once bookkeeping that needs no broker: settings, ids, and how a task's
transaction reacts to each kind of broker error (a stand-in producer records the calls)."""
from __future__ import annotations

from typing import Any, List, Optional

import pytest
from confluent_kafka import KafkaError, KafkaException

from shardworker import App
from shardworker.transactions import TaskTransaction, TransactionAborted, transactional_id


class RecordingProducer:
    """Stands in for a transactional confluent_kafka.Producer: records each call and
    raises what the test planted for a given call."""

    def __init__(self, fail: Optional[dict] = None) -> None:
        self.calls: List[str] = []
        self.fail = {name: list(errors) for name, errors in (fail or {}).items()}
        self.offsets: Any = None

    def _call(self, name: str) -> None:
        self.calls.append(name)
        planted = self.fail.get(name)
        if planted:
            raise KafkaException(planted.pop(0))

    def begin_transaction(self) -> None:
        self._call("begin")

    def flush(self, timeout: float) -> int:
        self._call("flush")
        return 0

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
        self.offsets = [(tp.topic, tp.partition, tp.offset) for tp in offsets]
        self._call("send_offsets")

    def commit_transaction(self, timeout: float) -> None:
        self._call("commit")

    def abort_transaction(self, timeout: float) -> None:
        self._call("abort")


def error(**kind: bool) -> KafkaError:
    return KafkaError(KafkaError._STATE, "planted", **kind)


def test_guarantee_setting_and_its_commit_interval():
    assert App("a").settings["commit_interval"] == 1.0
    assert not App("a").exactly_once
    eos = App("a", processing_guarantee="exactly_once")
    assert eos.exactly_once and eos.settings["commit_interval"] == 0.1
    assert App("a", processing_guarantee="exactly_once", commit_interval=0.5).settings["commit_interval"] == 0.5
    with pytest.raises(ValueError, match="at_least_once"):
        App("a", processing_guarantee="exactly-once")


def test_transactional_id_is_stable_per_app_and_task():
    assert transactional_id(App("proj"), "0_3") == "proj-0_3" == transactional_id(App("proj"), "0_3")
    assert transactional_id(App("proj"), "1_3") != transactional_id(App("proj"), "0_3")


def test_commit_sends_outputs_then_offsets_then_commits():
    producer = RecordingProducer()
    txn = TaskTransaction("0_1", producer)  # type: ignore[arg-type]
    txn.begin()
    txn.commit({("in", 1): 42}, b"metadata")
    assert producer.calls == ["begin", "flush", "send_offsets", "commit"]
    assert producer.offsets == [("in", 1, 42)]
    assert not txn.open
    txn.commit({}, b"metadata")  # nothing new but a timer's output: no offsets to send
    assert producer.calls[4:] == ["begin", "flush", "commit"]


def test_a_refused_transaction_is_aborted_and_says_so():
    producer = RecordingProducer({"commit": [error(txn_requires_abort=True)]})
    txn = TaskTransaction("0_1", producer)  # type: ignore[arg-type]
    txn.begin()
    with pytest.raises(TransactionAborted, match="0_1"):
        txn.commit({("in", 1): 42}, b"metadata")
    assert producer.calls[-1] == "abort" and not txn.open


def test_a_retriable_commit_is_retried_and_a_fatal_one_is_not_swallowed():
    producer = RecordingProducer({"commit": [error(retriable=True)]})
    txn = TaskTransaction("0_1", producer)  # type: ignore[arg-type]
    txn.commit({("in", 1): 42}, b"metadata")
    assert producer.calls.count("commit") == 2 and "abort" not in producer.calls

    fenced = RecordingProducer({"commit": [error(fatal=True)]})
    txn = TaskTransaction("0_1", fenced)  # type: ignore[arg-type]
    with pytest.raises(KafkaException):
        txn.commit({("in", 1): 42}, b"metadata")
    assert "abort" not in fenced.calls  # a fenced producer may not abort: the child ends
