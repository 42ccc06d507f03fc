"""Exactly-once bookkeeping that needs no broker: settings, ids, and how a task's
transaction reacts to each kind of broker error (a stand-in producer records the calls)."""
from __future__ import annotations

import time
from typing import Any, List

import pytest
from confluent_kafka import KafkaError, KafkaException

from shardworker import App
from shardworker.transactions import TaskTransaction, TransactionAborted, transactional_id
from tests.unit.fakes import RecordingProducer, error


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


def timed_out() -> KafkaError:
    """What librdkafka raises when a transactional call's timeout passed with the broker
    away: retriable, the call may be made again."""
    return KafkaError(KafkaError._TIMED_OUT, "planted timeout", retriable=True)


def test_an_unreachable_broker_is_waited_out_in_slices_with_heartbeats():
    """Issue 11, point 7: each call that needs the broker is made again while it times
    out, with a heartbeat to the supervisor in between (before, one call blocked 30 s)."""
    beats: List[float] = []
    producer = RecordingProducer({"send_offsets": [timed_out()], "commit": [timed_out(), timed_out()],
                                  "abort": [timed_out()]})
    txn = TaskTransaction("0_1", producer, heartbeat=lambda: beats.append(1))  # type: ignore[arg-type]
    txn.commit({("in", 1): 42}, b"metadata")
    assert producer.calls.count("send_offsets") == 2 and producer.calls.count("commit") == 3
    assert len(beats) == 3 and not txn.open and "abort" not in producer.calls
    txn.begin()
    txn.abort()
    assert producer.calls.count("abort") == 2 and len(beats) == 4 and not txn.open


def test_a_broker_away_past_the_bound_is_broker_unavailable_not_a_crash(monkeypatch):
    """Past BROKER_WAIT the child gives up with BrokerUnavailable (exit 75, uncounted);
    closing the task then waits only briefly for its abort."""
    from shardworker import broker_wait
    from shardworker.child import report_failure
    from shardworker.broker_wait import BrokerUnavailable
    from shardworker.protocol import EXIT_BROKER_UNAVAILABLE

    monkeypatch.setattr(broker_wait, "BROKER_SLICE", 0.01)
    monkeypatch.setattr(broker_wait, "BROKER_WAIT", 0.05)
    monkeypatch.setattr("shardworker.transactions.CLOSE_WAIT", 0.05)
    class Away(RecordingProducer):
        """Every call waits its timeout and times out, as with the broker stopped."""

        def commit_transaction(self, timeout: float) -> None:
            time.sleep(timeout)
            raise KafkaException(timed_out())

        def abort_transaction(self, timeout: float) -> None:
            self.calls.append("abort")
            time.sleep(timeout)
            raise KafkaException(timed_out())

    producer = Away()
    txn = TaskTransaction("0_1", producer)  # type: ignore[arg-type]
    with pytest.raises(BrokerUnavailable, match="0_1: committing") as raised:
        txn.commit({("in", 1): 42}, b"metadata")
    assert txn.open and "abort" not in producer.calls  # read again by the restarted child

    class Sent:
        def send(self, message: Any) -> None:
            self.fields = message.fields()

    sent = Sent()
    assert report_failure(sent, raised.value) == EXIT_BROKER_UNAVAILABLE  # type: ignore[arg-type]
    assert sent.fields["broker_unavailable"] is True
    txn.close()  # logs, does not raise
    assert producer.calls.count("abort") >= 1


def test_init_waits_out_the_broker_and_the_opener_heartbeats(monkeypatch):
    """Transactions.open waits out an unreachable broker in each init and heartbeats from
    its own thread (the one that owns the channel), never from an init's."""
    import threading
    import time as time_module

    from shardworker import transactions as txn_module
    from shardworker.transactions import Transactions

    class SlowInit(RecordingProducer):
        def init_transactions(self, timeout: float) -> None:
            time_module.sleep(timeout)
            self._call("init")

    from shardworker import broker_wait

    monkeypatch.setattr(txn_module, "BROKER_SLICE", 0.02)
    monkeypatch.setattr(broker_wait, "BROKER_SLICE", 0.02)
    monkeypatch.setattr(broker_wait, "BROKER_CALL_TIMEOUT", 0.02)
    producers = {"0_0": SlowInit({"init": [timed_out()] * 3}), "0_1": SlowInit()}
    monkeypatch.setattr(txn_module, "transactional_producer",
                        lambda app, bootstrap, task, client_id, on_delivery: producers[task])
    beats: List[str] = []
    app = App("a", processing_guarantee="exactly_once")

    @app.agent(app.topic("in", partitions=2))
    def agent(stream):  # pragma: no cover - never runs
        yield from stream

    transactions = Transactions(app, "b:9", "c", lambda err, msg: None,
                                heartbeat=lambda: beats.append(threading.current_thread().name))
    transactions.open(["0_0", "0_1"])
    assert producers["0_0"].calls == ["init"] * 4 and producers["0_1"].calls == ["init"]
    assert beats and set(beats) == {threading.main_thread().name}
    assert set(transactions.by_task) == {"0_0", "0_1"}


def test_a_call_that_blocks_past_its_timeout_still_heartbeats(monkeypatch):
    """librdkafka may block past a call's timeout (a request in flight waits for
    socket.timeout.ms): the call runs in a thread and the child heartbeats meanwhile."""
    from shardworker import broker_wait

    monkeypatch.setattr(broker_wait, "BROKER_SLICE", 0.02)

    class Stuck(RecordingProducer):
        def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
            time.sleep(0.3)  # whatever the timeout says
            super().send_offsets_to_transaction(offsets, metadata, timeout)

    beats: List[int] = []
    producer = Stuck()
    txn = TaskTransaction("0_1", producer, heartbeat=lambda: beats.append(1))  # type: ignore[arg-type]
    txn.commit({("in", 1): 42}, b"metadata")
    assert len(beats) >= 5 and producer.calls[-2:] == ["send_offsets", "commit"]


def test_new_tasks_producers_are_initialised_one_at_a_time(monkeypatch):
    """Each ``init_transactions`` may abort what the task's killed owner left open; two
    of those aborts at once, on partitions both transactions wrote, can wedge the test
    broker's later transactions on them for good (DESIGN.md, "Tests and the broker"), so
    no two inits of a child overlap, and they run in the order the tasks were given."""
    import threading

    from shardworker import transactions as txn_module
    from shardworker.transactions import Transactions

    lock = threading.Lock()
    in_flight: List[str] = []
    overlaps: List[List[str]] = []
    order: List[str] = []

    class Init(RecordingProducer):
        def __init__(self, task: str) -> None:
            super().__init__()
            self.task = task

        def init_transactions(self, timeout: float) -> None:
            with lock:
                in_flight.append(self.task)
                order.append(self.task)
                if len(in_flight) > 1:
                    overlaps.append(list(in_flight))
            time.sleep(0.05)  # long enough for any other init running beside it to show
            with lock:
                in_flight.remove(self.task)

    monkeypatch.setattr(txn_module, "transactional_producer",
                        lambda app, bootstrap, task, client_id, on_delivery: Init(task))
    app = App("a", processing_guarantee="exactly_once")

    @app.agent(app.topic("in", partitions=3))
    def agent(stream):  # pragma: no cover - never runs
        yield from stream

    transactions = Transactions(app, "b:9", "c", lambda err, msg: None)
    transactions.open(["0_2", "0_0", "0_1"])
    assert overlaps == [] and order == ["0_2", "0_0", "0_1"]
    assert set(transactions.by_task) == {"0_0", "0_1", "0_2"}
    transactions.open(["0_1"])  # a task held already keeps its producer
    assert order == ["0_2", "0_0", "0_1"]
