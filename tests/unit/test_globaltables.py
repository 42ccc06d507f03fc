"""Global tables without a broker: the mirror's apply logic over a real LMDB copy (last
value wins, None deletes, positions stored with the data, the caught-up mark), reading
a copy through ``GlobalTable``, the children's catch-up gate, and the declaration's
errors (DESIGN.md, "Global tables")."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from confluent_kafka import KafkaError, TopicPartition

from shardworker import App
from shardworker.globaltables import (META_CAUGHT_UP, CatchUpGate, GlobalTable, GlobalTableError,
                                      ReadOnlyTableError, caught_up_info, global_dir, open_copy)
from shardworker.store import TaskStore
from shardworker.tablecli import TableReadError, key_serializer, read_table
from supervisor.globalmirror import GlobalMirror, TableCopy, TopicRewound
from tests.unit.fakes import Message


def make_app() -> Tuple[App, GlobalTable]:
    app = App("g", broker="kafka://127.0.0.1:9")
    topic = app.topic("countries", key_serializer="str", value_serializer="json")
    return app, app.global_table("countries", topic=topic)


@pytest.fixture
def copy(tmp_path) -> Iterator[TableCopy]:
    """A copy of ``countries`` (partitions 0 and 1) catching up, as the mirror starts it."""
    _app, table = make_app()
    store = TaskStore(global_dir(str(tmp_path), "g", "countries"), ["countries"])
    copy = TableCopy(table, store)
    copy.begin_catch_up()
    copy.add_partitions([0, 1])
    try:
        yield copy
    finally:
        store.close()


def j(value: object) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.timeout(20)
def test_last_value_wins_none_deletes_and_offsets_are_stored(copy: TableCopy) -> None:
    copy.observe_end(0, 3)
    copy.observe_end(1, 2)
    assert not copy.apply([(0, 0, b"a", j(1)), (0, 1, b"b", j(2)), (0, 2, b"a", j(3))])
    store = copy.store
    assert store.get("countries", b"a") == j(3) and store.get("countries", b"b") == j(2)
    assert store.input_offsets() == {("countries", 0): 3}
    assert store.get_meta(META_CAUGHT_UP) is None, "partition 1 is not there yet"
    assert copy.apply([(1, 0, b"b", None), (1, 1, b"c", j(4))]) is True
    assert store.get("countries", b"b") is None and store.get("countries", b"c") == j(4)
    assert store.input_offsets() == {("countries", 0): 3, ("countries", 1): 2}
    assert caught_up_info(store) == {"ends": {"0": 3, "1": 2}}
    assert copy.caught_up
    # following live: it never completes twice, and records still land
    assert not copy.apply([(1, 2, b"c", j(5))])
    assert store.get("countries", b"c") == j(5) and store.input_offsets()[("countries", 1)] == 3


@pytest.mark.timeout(20)
def test_an_end_of_partition_event_completes_an_empty_or_unknown_partition(copy: TableCopy) -> None:
    copy.observe_end(0, 1)
    assert not copy.apply([(0, 0, b"a", j(1))]), "partition 1's end is not known yet"
    assert copy.apply([], ends={1: 0}) is True
    assert caught_up_info(copy.store) == {"ends": {"0": 1, "1": 0}}


@pytest.mark.timeout(20)
def test_the_first_end_seen_is_the_target_and_later_ones_do_not_move_it(copy: TableCopy) -> None:
    copy.observe_end(0, 2)
    copy.observe_end(0, 50)  # the topic grew meanwhile: catching up to 2 is enough
    copy.observe_end(1, 0)
    assert copy.apply([(0, 0, b"a", j(1)), (0, 1, b"b", j(1))]) is True


@pytest.mark.timeout(20)
def test_no_catch_up_before_the_partitions_are_known(tmp_path) -> None:
    _app, table = make_app()
    with TaskStore(str(tmp_path / "c"), ["countries"]) as store:
        copy = TableCopy(table, store)
        copy.begin_catch_up()
        assert not copy.apply([(0, 0, b"a", j(1))], ends={0: 1})
        assert store.get_meta(META_CAUGHT_UP) is None


@pytest.mark.timeout(20)
def test_a_restart_resumes_from_the_stored_offsets_and_clears_the_mark(tmp_path) -> None:
    _app, table = make_app()
    path = str(tmp_path / "c")
    with TaskStore(path, ["countries"]) as store:
        copy = TableCopy(table, store)
        copy.begin_catch_up()
        copy.add_partitions([0])
        assert copy.apply([(0, 0, b"a", j(1)), (0, 1, b"a", j(2))], ends={0: 2})
    with TaskStore(path, ["countries"]) as store:
        again = TableCopy(table, store)
        assert again.positions == {0: 2}
        assert caught_up_info(store) is not None
        again.begin_catch_up()  # a new supervisor run: children wait for the new end
        assert caught_up_info(store) is None
        again.add_partitions([0])
        again.observe_end(0, 0)  # an end below the position is no target: it proves nothing
        assert not again.apply([]) and again.unknown_ends() == [0]
        with pytest.raises(TopicRewound):  # offsets below the stored position: recreated topic
            again.apply([(0, 0, b"a", j(9))])
        assert store.get("countries", b"a") == j(2), "nothing of a rewound batch is written"
        with pytest.raises(TopicRewound):  # an empty topic of that name (a fresh broker)
            again.apply([], ends={0: 0})
        store.set_identity("cluster", "countries")
        again.rewind()
        assert again.positions == {} and store.get("countries", b"a") is None
        assert store.identity() == {"cluster_id": "cluster", "source": "countries"}
        again.add_partitions([0])
        assert again.apply([(0, 0, b"a", j(9))], ends={0: 1})
        assert store.get("countries", b"a") == j(9)


@pytest.mark.timeout(20)
def test_a_record_without_a_key_moves_the_position_only(copy: TableCopy) -> None:
    copy.apply([(0, 0, None, j(1))])
    assert copy.keyless == 1 and copy.store.count("countries") == 0
    assert copy.store.input_offsets() == {("countries", 0): 1}


def write_copy(datadir: str, caught_up: bool = True) -> None:
    """A copy of ``countries`` as the mirror leaves it, closed (one process may not open
    an LMDB environment twice)."""
    _app, table = make_app()
    with TaskStore(global_dir(datadir, "g", "countries"), ["countries"]) as store:
        copy = TableCopy(table, store)
        copy.begin_catch_up()
        copy.add_partitions([0])
        copy.apply([(0, 0, b"DE", j({"name": "Germany"})), (0, 1, b"FR", j({"name": "France"})),
                    (0, 2, b"XX", j({"name": "gone"})), (0, 3, b"XX", None)],
                   ends={0: 4} if caught_up else {})


@pytest.mark.timeout(20)
def test_a_global_table_reads_its_copy(tmp_path) -> None:
    write_copy(str(tmp_path))
    app, table = make_app()
    with pytest.raises(GlobalTableError, match="not open in this process"):
        table.get("DE")
    table.attach(open_copy(global_dir(str(tmp_path), "g", "countries"), "countries"))
    try:
        assert table.get("DE") == {"name": "Germany"} and table["FR"] == {"name": "France"}
        assert table.get("XX") is None and table.get("XX", "none") == "none"
        with pytest.raises(KeyError):
            table["XX"]
        assert "DE" in table and "XX" not in table and len(table) == 2
        assert list(table.keys()) == ["DE", "FR"] and list(table) == ["DE", "FR"]
        assert dict(table.items()) == {"DE": {"name": "Germany"}, "FR": {"name": "France"}}
        assert list(table.values()) == [{"name": "Germany"}, {"name": "France"}]
        with pytest.raises(ReadOnlyTableError, match="read-only: it mirrors topic 'countries'"):
            table["DE"] = {"name": "Deutschland"}
        with pytest.raises(ReadOnlyTableError):
            del table["DE"]
        with pytest.raises(ReadOnlyTableError):
            table.update({"DE": 1})
    finally:
        table.detach()
    defaulted = GlobalTable("countries", app.topics["countries"], default=dict)
    defaulted.attach(open_copy(global_dir(str(tmp_path), "g", "countries"), "countries"))
    try:
        assert defaulted["nowhere"] == {}
    finally:
        defaulted.detach()


@pytest.mark.timeout(20)
def test_the_gate_opens_once_the_copy_has_caught_up(tmp_path) -> None:
    app, table = make_app()
    gate = CatchUpGate(app.global_tables, str(tmp_path), app.id)
    assert gate.wait(0) is False, "no copy yet: the mirror has not created it"
    write_copy(str(tmp_path), caught_up=False)
    assert gate.wait(0.05) is False and not table.is_open
    gate.close()
    _app, writer_table = make_app()
    with TaskStore(global_dir(str(tmp_path), "g", "countries"), ["countries"]) as store:
        copy = TableCopy(writer_table, store)
        copy.add_partitions([0])
        assert copy.apply([], ends={0: 4})
    gate = CatchUpGate(app.global_tables, str(tmp_path), app.id)
    assert gate.wait(0) is True and table.is_open and table.get("DE") == {"name": "Germany"}
    assert gate.wait(0) is True
    gate.close()
    assert not table.is_open
    assert CatchUpGate([], str(tmp_path), "g").wait(0) is True, "no global tables: no wait"


@pytest.mark.timeout(20)
def test_a_child_that_closes_closes_the_copies_it_opened(tmp_path) -> None:
    from shardworker.worker import Worker

    class Anything:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    app, table = make_app()
    worker = Worker(app, channel=Anything(), bootstrap="127.0.0.1:9", index=0,  # type: ignore[arg-type]
                    datadir=str(tmp_path))
    worker.consumer = worker.state = worker.committer = Anything()  # type: ignore[assignment]
    write_copy(str(tmp_path))
    assert worker.global_tables.wait(0) is True and table.is_open
    worker.close()
    assert not table.is_open


@pytest.mark.timeout(20)
def test_the_table_command_reads_a_global_table(tmp_path) -> None:
    write_copy(str(tmp_path))
    app, _table = make_app()
    assert read_table(app, str(tmp_path), "countries") == {"DE": {"name": "Germany"},
                                                           "FR": {"name": "France"}}
    assert read_table(app, str(tmp_path), "countries", "FR") == {"name": "France"}
    with pytest.raises(TableReadError, match="has no key 'XX'"):
        read_table(app, str(tmp_path), "countries", "XX")
    assert key_serializer(app, "countries") == "str" and key_serializer(app, "counts") == "json"
    with pytest.raises(TableReadError, match="no copy of global table"):
        read_table(app, str(tmp_path / "elsewhere"), "countries")
    assert not os.path.exists(tmp_path / "elsewhere")


@pytest.mark.timeout(20)
def test_declaration_errors_are_one_line() -> None:
    app, _table = make_app()
    with pytest.raises(ValueError, match="two tables named 'countries'"):
        app.global_table("countries", topic=app.topics["countries"])
    with pytest.raises(ValueError, match="two tables named 'countries'"):
        app.table("countries")
    app.table("counts")
    with pytest.raises(ValueError, match="two tables named 'counts'"):
        app.global_table("counts", topic=app.topic("other"))
    with pytest.raises(ValueError, match="topic 'nowhere' is not declared"):
        app.global_table("x", topic="nowhere")
    stranger = App("s").topic("theirs")
    with pytest.raises(ValueError, match="topic 'theirs' is not declared by app 'g'"):
        app.global_table("y", topic=stranger)
    with pytest.raises(ValueError, match="is mirrored by global table 'countries' already"):
        app.global_table("z", topic="countries")
    with pytest.raises(ValueError, match="bad global table name"):
        app.global_table("a/b", topic=app.topic("other2"))
    assert [t.name for t in app.global_tables] == ["countries"]
    assert [t.name for t in app.tables] == ["counts"]
    by_name = app.global_table("by_name", topic="other")
    assert by_name.topic is app.topics["other"]


class EndOfPartition(Message):
    """The event a consumer with ``enable.partition.eof`` gives at a partition's end."""

    def error(self) -> KafkaError:  # type: ignore[override]
        return KafkaError(KafkaError._PARTITION_EOF)


class ScriptedConsumer:
    """Stands in for the mirror's consumer: two partitions, scripted batches, the high
    watermarks the test sets; records what it was assigned."""

    def __init__(self, topic: str, batches: List[List[Message]], high: Dict[int, int]) -> None:
        self.topic = topic
        self.batches = batches
        self.high = high
        self.assigned: List[List[Tuple[int, int]]] = []

    def list_topics(self, topic: str, timeout: float) -> Any:
        meta = SimpleNamespace(partitions={0: None, 1: None}, error=None)
        return SimpleNamespace(topics={self.topic: meta})

    def assign(self, tps: List[TopicPartition]) -> None:
        self.assigned.append([(tp.partition, tp.offset) for tp in tps])

    def consume(self, count: int, timeout: float) -> List[Message]:
        return self.batches.pop(0) if self.batches else []

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> Tuple[int, int]:
        return 0, self.high.get(tp.partition, -1001)


@pytest.mark.timeout(20)
def test_the_mirror_reads_committed_records_and_catches_up_without_librdkafkas_backoff(
        tmp_path) -> None:
    from shardworker.app import FETCH_QUEUE_BACKOFF_MS

    app, _table = make_app()
    config = GlobalMirror(app, "127.0.0.1:9", str(tmp_path), "cluster").consumer_config()
    assert config["fetch.queue.backoff.ms"] == FETCH_QUEUE_BACKOFF_MS < 1000
    assert config["auto.offset.reset"] == "earliest"
    assert config["isolation.level"] == "read_committed"
    own = App("own", kafka_config={"fetch.queue.backoff.ms": 500})
    assert own.consumer_config("127.0.0.1:9")["fetch.queue.backoff.ms"] == 500  # theirs wins


@pytest.mark.timeout(20)
def test_the_mirror_turns_batches_into_the_copy_and_rewinds_a_recreated_topic(tmp_path) -> None:
    app, table = make_app()
    mirror = GlobalMirror(app, "127.0.0.1:9", str(tmp_path), "cluster")
    store = TaskStore(global_dir(str(tmp_path), "g", "countries"), ["countries"])
    copy = TableCopy(table, store)
    copy.begin_catch_up()
    mirror.copies.append(copy)
    t = "countries"
    consumer = ScriptedConsumer(t, [
        [Message(t, 0, 0, j(1), key=b"a"), Message(t, 1, 0, j(2), key=b"b")],
        [Message(t, 0, 1, None, key=b"a"), EndOfPartition(t, 1, 1)],
        [Message(t, 0, 2, j(3), key=b"c")],                 # live, after the catch-up
        [Message(t, 0, 0, j(9), key=b"z")],                 # below the position: recreated
        [Message(t, 0, 0, j(9), key=b"z"), EndOfPartition(t, 0, 1), EndOfPartition(t, 1, 0)],
    ], high={0: 2})
    try:
        mirror.turn(consumer)  # type: ignore[arg-type]
        # no copy yet: read from offset 0, not OFFSET_BEGINNING (test_beginning.py)
        assert consumer.assigned == [[(0, 0), (1, 0)]]
        assert not copy.caught_up and copy.unknown_ends() == [1]
        mirror.turn(consumer)  # type: ignore[arg-type]
        assert copy.caught_up and caught_up_info(store) == {"ends": {"0": 2, "1": 1}}
        assert store.get(t, b"a") is None and store.get(t, b"b") == j(2)
        mirror.turn(consumer)  # type: ignore[arg-type]
        assert store.get(t, b"c") == j(3) and copy.positions == {0: 3, 1: 1}
        mirror.turn(consumer)  # type: ignore[arg-type]
        assert not copy.caught_up and caught_up_info(store) is None and store.count(t) == 0
        mirror.turn(consumer)  # type: ignore[arg-type]
        assert consumer.assigned[-1] == [(0, 0), (1, 0)]
        assert copy.caught_up and dict(store.items(t)) == {b"z": j(9)}
    finally:
        store.close()
