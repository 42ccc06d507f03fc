"""A partition read from its beginning is assigned at offset 0, never at OFFSET_BEGINNING:
the test broker answers the ListOffsets(earliest) request librdkafka would send with the
batch it stored first, which may not be the first one (DESIGN.md, "Tests and the
broker")."""
from __future__ import annotations

from typing import Any, List

import pytest

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END

from shardworker import App
from shardworker.beginning import assignable
from shardworker.committers import ExactlyOnce
from shardworker.restore import Restorer
from shardworker.store import TaskStore
from shardworker.worker import Worker


def test_offset_beginning_becomes_zero_and_other_offsets_stay():
    tp = assignable("in", 2, OFFSET_BEGINNING)
    assert (tp.topic, tp.partition, tp.offset) == ("in", 2, 0)
    assert assignable("in", 2, 41).offset == 41
    assert assignable("in", 2, OFFSET_END).offset == OFFSET_END


class Consumer:
    """Records what the worker assigns."""

    def __init__(self) -> None:
        self.assigned: List[Any] = []

    def incremental_assign(self, tps: List[Any]) -> None:
        self.assigned.extend((tp.topic, tp.partition, tp.offset) for tp in tps)

    def incremental_unassign(self, tps: List[Any]) -> None:
        pass


class Anything:
    """Accepts any call (the channel, a state without tables)."""

    enabled = False

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class GivenStarts:
    """A committer that starts where the supervisor says (at least once)."""

    def starts(self, partitions: List[List[Any]], settle_all: Any) -> List[List[Any]]:
        return partitions


def worker_of(app: App) -> Worker:
    """A worker of ``app`` with a recording consumer, no tables and no supervisor."""
    channel: Any = Anything()
    worker = Worker(app, channel=channel, bootstrap="127.0.0.1:9", index=0)
    worker.consumer = Consumer()  # type: ignore[assignment]
    worker.state = Anything()  # type: ignore[assignment]
    return worker


def app_reading(partitions: int, guarantee: str = "at_least_once") -> App:
    app = App("u", processing_guarantee=guarantee)

    @app.agent(app.topic("in", partitions=partitions))
    def agent(stream):  # pragma: no cover - never runs
        yield from stream

    return app


def test_a_task_without_a_committed_offset_is_assigned_at_offset_zero():
    worker = worker_of(app_reading(2))
    worker.committer = GivenStarts()  # type: ignore[assignment]
    worker.assign([["in", 0, OFFSET_BEGINNING], ["in", 1, 5]])
    assert worker.consumer.assigned == [("in", 0, 0), ("in", 1, 5)]  # type: ignore[attr-defined]
    # nothing is processed yet: no offset to report or to commit for partition 0
    assert worker.positions == {("in", 0): OFFSET_BEGINNING, ("in", 1): 5}


def test_a_rewound_task_that_never_committed_reads_again_from_offset_zero():
    app = app_reading(1, "exactly_once")
    worker = worker_of(app)
    committer = ExactlyOnce(app, "127.0.0.1:9", "c", worker._delivery_errors, worker.heartbeat,
                            worker.consumer, worker.state, worker.positions)
    worker.positions[("in", 0)] = OFFSET_BEGINNING
    committer.rewind("0_0")
    assert worker.consumer.assigned == [("in", 0, 0)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["smallest", "end", "error", "Earliest"])
def test_an_offset_reset_other_than_earliest_or_latest_is_refused(value):
    """The beginning is assigned as offset 0 only under ``earliest``; librdkafka's other
    spellings would be read as it by the supervisor, so they are refused at once."""
    with pytest.raises(ValueError, match="auto_offset_reset"):
        App("u", auto_offset_reset=value)
    assert App("u", auto_offset_reset="latest").settings["auto_offset_reset"] == "latest"


def test_a_rewound_task_that_started_at_the_end_reads_again_what_it_read():
    """``latest`` and no commit yet: an aborted first transaction is read again from the
    first offset the task read, not from the end again (which would skip it)."""
    from tests.unit.fakes import Message

    app = app_reading(1, "exactly_once")
    worker = worker_of(app)
    committer = ExactlyOnce(app, "127.0.0.1:9", "c", worker._delivery_errors, worker.heartbeat,
                            worker.consumer, worker.state, worker.positions)
    worker.positions[("in", 0)] = OFFSET_END
    for _chunk in committer.chunks([Message("in", 0, offset) for offset in (7, 8, 9)]):
        pass
    committer.rewind("0_0")
    assert worker.consumer.assigned == [("in", 0, 7)]  # type: ignore[attr-defined]


class EmptyChangelogs:
    """A restore consumer over empty changelogs: records what it is assigned; each
    assigned partition ends at once."""

    def __init__(self) -> None:
        self.assigned: List[List[Any]] = []
        self._ends: List[Any] = []

    def assign(self, tps: List[Any]) -> None:
        self.assigned.append([(tp.topic, tp.partition, tp.offset) for tp in tps])
        self._ends = [End(tp.topic, tp.partition) for tp in tps]

    def unassign(self) -> None:
        self._ends = []

    def consume(self, n: int, timeout: float) -> List[Any]:
        ends, self._ends = self._ends, []
        return ends

    def poll(self, timeout: float) -> None:
        return None


class End:
    """The end-of-partition event (``enable.partition.eof``)."""

    def __init__(self, topic: str, partition: int) -> None:
        self._topic, self._partition = topic, partition

    def error(self) -> Any:
        from confluent_kafka import KafkaError

        return KafkaError(KafkaError._PARTITION_EOF)

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition


def test_restore_reads_a_changelog_from_offset_zero_whatever_the_reset_policy(tmp_path):
    """A store with nothing of a changelog reads it from offset 0, and the restore
    consumer resets to the earliest offset even when the app's policy is ``latest``
    (offset 0 gone to retention on Kafka must not mean "from the end")."""
    app = App("u", auto_offset_reset="latest")
    counts = app.table("counts")

    @app.agent(app.topic("in", partitions=2))
    def agent(stream):  # pragma: no cover - never runs
        for _ in stream:
            counts["k"] = 1
            yield None

    restorer = Restorer(app, {"auto.offset.reset": "latest"}, heartbeat=lambda: None)
    assert restorer.restore_consumer_config()["auto.offset.reset"] == "earliest"
    consumer = EmptyChangelogs()
    restorer._restore_consumer = consumer  # type: ignore[assignment]
    store = TaskStore(str(tmp_path / "0_1"), ["counts"])
    try:
        restorer.restore("0_1", store, [counts], {("in", 1): 5})
        assert restorer._confirmed_positions([counts], {("in", 1): 5}) == {}
    finally:
        store.close()
    assert consumer.assigned == [[("u-counts-changelog", 1, 0)]] * 2
