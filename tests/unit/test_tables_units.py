"""Unit tests of the table storage layer: the Java partitioner, the LMDB task store,
tables and their write cache, windowed tables, and the changelog restore rule.  Real LMDB
in tmp_path; nothing that a test checks is mocked.  The tests of this layer that need a
broker or other processes are tests/integration/test_tables_processes.py."""
from __future__ import annotations

import json
import os
import struct
import time
from typing import Dict, List, Optional, Tuple

import lmdb
import pytest

import shardworker

from shardworker.codecs import FunctionCodec, get_codec
from shardworker.produce import RecordTooLarge
from shardworker.partitioner import key_partitioner, murmur2, partition_for
from shardworker.store import TaskStore
from shardworker.changelog import (HDR_SRC_CONFIRMED, HDR_SRC_OFFSET, HDR_SRC_PARTITION,
                                   HDR_SRC_TOPIC, HDR_STREAM_TIME)
from shardworker.restore import apply_changelog
from shardworker.tables import Table
from shardworker.tablecontext import (SMALL_INT_MAX, SMALL_INT_MIN, NoCurrentRecordError,
                                      TableContext, TableError)
from shardworker.tasktables import TaskTables
from shardworker.windows import split_window_key, window_key

SRC = "orders"


class CountingStore(TaskStore):
    """A real TaskStore that also counts the key writes each commit applies."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.commits: List[Dict[str, int]] = []

    def commit(self, writes, input_offsets, changelog_offsets, meta=None):  # type: ignore[no-untyped-def]
        self.commits.append({table: len(kv) for table, kv in writes.items()})
        super().commit(writes, input_offsets, changelog_offsets, meta)


def open_task(path, tables: List[Table], partition: int = 0, key_partition=None,
              store_cls=TaskStore, map_size: int = 64 << 20) -> TaskTables:
    store = store_cls(str(path), [t.name for t in tables], map_size=map_size)
    return TaskTables(store, tables, partition, SRC, key_partition, task_id=f"0_{partition}")


def table(name: str, ctx: TableContext, **kwargs) -> Table:  # type: ignore[no-untyped-def]
    return Table(name, app_id="app", context=ctx, **kwargs)


# -- partitioner ---------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_murmur2_matches_java_kafka_vectors():
    # org.apache.kafka.common.utils.UtilsTest and librdkafka's rdmurmur2.c unit test
    vectors = {
        b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, b"abc": 479470107,
        b"kafka": 0xD067CF64 - (1 << 32), b"": 0x106E08D9, b"1": -1993445489,
        b"12": 126087238, b"123": -267702483, b"1234": -1614185708, b"12345": -1188365604,
    }
    for data, expected in vectors.items():
        assert murmur2(data) == expected, data
    assert partition_for(b"21", 1 << 31) == (-973932308 & 0x7FFFFFFF)
    with pytest.raises(ValueError):
        partition_for(None, 3)


# -- the store -----------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_commit_applies_state_and_offsets_together(tmp_path):
    store = TaskStore(str(tmp_path / "s"), ["counts", "other"])
    store.commit({"counts": {b"a": b"1", b"b": b"2"}, "other": {b"x": b"y"}},
                 {(SRC, 3): 17}, {"counts": 41})
    assert store.get("counts", b"a") == b"1" and store.get("other", b"x") == b"y"
    assert store.input_offset(SRC, 3) == 17 and store.changelog_offset("counts") == 41
    assert store.input_offsets() == {(SRC, 3): 17}
    # a write that fails in the middle of the transaction leaves nothing of the batch
    with pytest.raises(lmdb.BadValsizeError):
        store.commit({"counts": {b"a": b"100", b"c": b"3", b"": b"bad key"}},
                     {(SRC, 3): 99}, {"counts": 99})
    assert store.get("counts", b"a") == b"1" and store.get("counts", b"c") is None
    assert store.input_offset(SRC, 3) == 17 and store.changelog_offset("counts") == 41
    # deletes
    store.commit({"counts": {b"a": None}}, {(SRC, 3): 18}, {})
    assert store.get("counts", b"a") is None and dict(store.items("counts")) == {b"b": b"2"}
    store.close()


@pytest.mark.timeout(60)
def test_full_map_grows_instead_of_failing(tmp_path):
    store = TaskStore(str(tmp_path / "s"), ["big"], map_size=64 * 1024)
    initial = store.map_size
    value = os.urandom(900)
    for batch in range(20):  # ~3.6 MB in all, 50 times the initial map
        store.commit({"big": {b"%05d-%03d" % (batch, n): value for n in range(200)}},
                     {(SRC, 0): batch + 1}, {})
    assert store.map_size >= 32 * initial
    assert store.count("big") == 4000 and store.get("big", b"00019-199") == value
    keys = [k for k, _v in store.items("big")]  # items() reads in chunks of 1000
    assert keys == sorted(set(keys)) and len(keys) == 4000
    assert store.input_offset(SRC, 0) == 20
    store.close()
    reopened = TaskStore(str(tmp_path / "s"), ["big"], map_size=64 * 1024)
    assert reopened.count("big") == 4000 and reopened.map_size >= 32 * initial
    reopened.close()


@pytest.mark.timeout(20)
def test_identity_mismatch_wipes_the_state(tmp_path):
    store = TaskStore(str(tmp_path / "s"), ["counts"])
    assert store.identity() is None
    assert store.ensure_identity("cluster-A", SRC) is False
    store.commit({"counts": {b"a": b"1"}}, {(SRC, 0): 10}, {"counts": 3})
    assert store.ensure_identity("cluster-A", SRC) is False  # same: kept
    assert store.get("counts", b"a") == b"1"
    assert store.identity() == {"cluster_id": "cluster-A", "source": SRC}
    assert store.ensure_identity("cluster-B", SRC) is True  # another cluster: wiped
    assert store.get("counts", b"a") is None and store.count("counts") == 0
    assert store.input_offset(SRC, 0) is None and store.changelog_offset("counts") is None
    assert store.identity() == {"cluster_id": "cluster-B", "source": SRC}
    store.wipe()
    assert store.identity() is None
    store.close()


# -- tables --------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_a_hot_key_costs_one_put_and_one_changelog_record(tmp_path):
    ctx = TableContext()
    counts = table("counts", ctx, default=int)
    task = open_task(tmp_path / "s", [counts], store_cls=CountingStore)
    for offset in range(1000):
        ctx.set_record(task, SRC, 0, offset, 1_000_000 + offset)
        counts["hot"] += 1
        counts[f"cold{offset % 3}"] = offset
    assert counts["hot"] == 1000
    batch = task.drain()
    assert len(batch.records) == 4 and batch.input_offsets == {(SRC, 0): 1000}
    hot = [r for r in batch.records if r.key == b'"hot"']
    assert len(hot) == 1 and hot[0].value == b"1000"
    assert hot[0].topic == "app-counts-changelog" and hot[0].partition == 0
    assert dict(hot[0].headers) == {HDR_SRC_TOPIC: SRC.encode(), HDR_SRC_PARTITION: b"0",
                                    HDR_SRC_OFFSET: b"999", HDR_STREAM_TIME: b"1000999",
                                    HDR_SRC_CONFIRMED: b"0"}  # nothing in LMDB yet
    assert counts["hot"] == 1000  # drained, not committed: still visible
    batch.commit({"counts": 123})
    store = task.store
    assert store.commits == [{"counts": 4}]  # type: ignore[attr-defined]
    assert store.get("counts", b'"hot"') == b"1000" and store.input_offset(SRC, 0) == 1000
    assert store.changelog_offset("counts") == 123
    ctx.set_record(task, SRC, 0, 1000, None)
    assert sorted(counts.items()) == [("cold0", 999), ("cold1", 997), ("cold2", 998),
                                      ("hot", 1000)]
    task.close()


@pytest.mark.timeout(20)
def test_table_is_a_dict_over_the_current_task(tmp_path):
    ctx = TableContext()
    t = table("t", ctx)
    task = open_task(tmp_path / "s", [t])
    with pytest.raises(NoCurrentRecordError):
        t["x"]
    ctx.set_record(task, SRC, 0, 0, None)
    assert "a" not in t and t.get("a", 7) == 7
    with pytest.raises(KeyError):
        t["a"]
    t["a"] = {"n": [1, 2]}
    t["b"] = 2
    assert t["a"] == {"n": [1, 2]} and "a" in t and len(t) == 2
    t["a"]["n"].append(3)  # mutating what you read stores nothing (until assigned back)
    assert t["a"] == {"n": [1, 2]}
    task.drain().commit()
    ctx.set_record(task, SRC, 0, 1, None)
    del t["b"]
    with pytest.raises(KeyError):
        del t["b"]
    t["c"] = 3
    assert t.pop("c") == 3 and t.pop("c", None) is None
    t["d"] = None  # None deletes
    assert sorted(t.keys()) == ["a"] and list(t.values()) == [{"n": [1, 2]}]
    batch = task.drain()
    assert {r.key: r.value for r in batch.records} == {b'"b"': None, b'"c"': None,
                                                       b'"d"': None}
    ctx.set_record(task, SRC, 0, 2, None)
    assert "b" not in t  # the drained delete is visible before its commit
    batch.commit()
    assert task.store.get("t", b'"b"') is None and task.store.get("t", b'"a"') is not None
    assert t.changelog_topic == "app-t-changelog"
    with pytest.raises(TableError):
        Table("u").changelog_topic
    assert Table("u").attach("shop").changelog_topic == "shop-u-changelog"
    task.close()


@pytest.mark.timeout(20)
def test_a_failed_record_that_wrote_a_key_several_times_leaves_it_as_it_found_it(tmp_path):
    ctx = TableContext()
    t = table("t", ctx, default=int)
    task = open_task(tmp_path / "s", [t])
    ctx.set_record(task, SRC, 0, 0, None)
    t["a"] += 1                       # record 0: a = 1, in the write cache
    ctx.set_record(task, SRC, 0, 1, None)
    t["a"] += 10
    t["a"] += 100
    t["b"] = 5
    del t["a"]
    t["a"] = 7
    task.rollback_record()            # record 1 failed: a as record 0 left it, no b
    assert t["a"] == 1 and "b" not in t
    ctx.set_record(task, SRC, 0, 2, None)
    t["a"] += 1
    batch = task.drain()
    assert {r.key: r.value for r in batch.records} == {b'"a"': b"2"}
    task.close()


@pytest.mark.timeout(20)
def test_ints_encoded_at_the_drain_are_the_bytes_a_write_would_have_made(tmp_path):
    ctx = TableContext()
    t = table("t", ctx)
    lazy = table("lazy", ctx, value_serializer="str")  # not json: encoded at each write
    task = open_task(tmp_path / "s", [t, lazy])
    values = {"small": 7, "negative": -3, "edge": (1 << 63) - 1, "low": -(1 << 63),
              "huge": 1 << 70, "flag": True, "zero": 0}
    ctx.set_record(task, SRC, 0, 0, None)
    for key, value in values.items():
        t[key] = value
    lazy["n"] = 5
    assert t["huge"] == 1 << 70 and t["flag"] is True and t["edge"] == (1 << 63) - 1
    # a raw read (what sessions and closing windows read) and a scan see the bytes
    assert task.read_raw("t", b'"small"') == (7, b"7")
    assert dict(task.range_raw("t", b'"e', b'"f')) == {b'"edge"': b"9223372036854775807"}
    assert dict(t.items()) == values
    batch = task.drain()
    encode = get_codec("json", None, "value")[0]
    assert {r.key: r.value for r in batch.records if r.topic == "app-t-changelog"} == {
        encode(k): encode(v) for k, v in values.items()}
    assert [r.value for r in batch.records if r.topic == "app-lazy-changelog"] == [b"5"]
    ctx.set_record(task, SRC, 0, 1, None)
    assert t["small"] == 7  # drained, in flight
    batch.commit()
    assert task.store.get("t", b'"low"') == b"-9223372036854775808"
    assert task.store.get("t", b'"flag"') == b"true"
    task.close()


@pytest.mark.timeout(20)
def test_a_counter_stepping_past_the_inline_bound_keeps_its_value_and_bytes(tmp_path):
    """Writes over a deferred int: small ints are staged by ``Table.__setitem__`` itself,
    larger ones by ``TaskTables.write`` (deferred up to 64 bits, encoded beyond); each
    reads back, rolls back and drains the same either way."""
    ctx = TableContext()
    t = table("t", ctx)
    task = open_task(tmp_path / "s", [t])
    ctx.set_record(task, SRC, 0, 0, None)
    steps = [7, SMALL_INT_MAX, SMALL_INT_MAX + 1, SMALL_INT_MIN - 1, (1 << 63) - 1, 1 << 63, 5]
    for value in steps:
        t["k"] = value
        assert t["k"] == value
    ctx.set_record(task, SRC, 0, 1, None)
    t["k"] = SMALL_INT_MAX + 1
    t["k"] = 1 << 64
    task.rollback_record()
    assert t["k"] == 5
    ctx.set_record(task, SRC, 0, 2, None)
    t["k"] += SMALL_INT_MAX  # 5 + MAX: past the bound, by write
    t["j"] = 1
    t["j"] += 1
    assert {r.key: r.value for r in task.drain().records} == {
        b'"k"': b"%d" % (5 + SMALL_INT_MAX), b'"j"': b"2"}
    task.close()


@pytest.mark.timeout(20)
def test_an_int_is_encoded_at_the_write_when_the_table_or_its_size_asks_it(tmp_path):
    # a codec of json's own functions that declares no round-trip types: its ints are
    # decoded when read, so they must be real bytes in the cache
    encode, decode = get_codec("json", None, "value")
    ctx = TableContext()
    plain = table("plain", ctx, value_serializer=FunctionCodec("myjson", encode, decode,
                                                               handles_none=True))
    counts = table("counts", ctx)
    store = TaskStore(str(tmp_path / "s"), ["plain", "counts"])
    task = TaskTables(store, [plain, counts], 0, SRC, max_message_bytes=1000)
    ctx.set_record(task, SRC, 0, 0, None)
    plain["k"] = 5
    plain["k"] += 1
    assert plain["k"] == 6
    # a key so long that a 20-byte int would not fit its changelog record: the write fails
    # (the record is dead-lettered), not the batch's produce
    long_key = "x" * 468                                   # 470 bytes as json
    counts[long_key] = 7                                   # 1 byte: fits
    with pytest.raises(RecordTooLarge):
        counts[long_key] = -9 * 10 ** 18
    assert [(r.key, r.value) for r in task.drain().records] == [
        (b'"k"', b"6"), (f'"{long_key}"'.encode(), b"7")]
    task.close()


@pytest.mark.timeout(20)
def test_a_restarted_task_ignores_writes_of_records_below_its_stored_offset(tmp_path):
    ctx = TableContext()
    counts = table("counts", ctx, default=int)
    task = open_task(tmp_path / "s", [counts])
    for offset in range(10):
        ctx.set_record(task, SRC, 0, offset, None)
        counts["k"] += 1
    task.drain().commit()
    task.close()
    # the restarted task gets offsets 5.. again (the supervisor had committed only 5)
    task = open_task(tmp_path / "s", [counts])
    assert task.stored == {(SRC, 0): 10}
    for offset in range(5, 13):
        ctx.set_record(task, SRC, 0, offset, None)
        assert ctx.writable is (offset >= 10)
        before = counts["k"]  # reads work throughout
        counts["k"] += 1
        assert counts["k"] == (before if offset < 10 else before + 1)
    batch = task.drain()
    assert [(r.key, r.value) for r in batch.records] == [(b'"k"', b"13")]
    assert batch.input_offsets == {(SRC, 0): 13}
    batch.commit()
    assert task.store.get("counts", b'"k"') == b"13" and task.store.input_offset(SRC, 0) == 13
    # records that all lie below the stored offset produce nothing
    ctx.set_record(task, SRC, 0, 3, None)
    counts["k"] = 999
    assert counts["k"] == 13
    batch = task.drain()
    assert batch.empty
    batch.commit()
    assert task.store.input_offset(SRC, 0) == 13  # never moves backwards
    task.close()


@pytest.mark.timeout(20)
def test_a_record_below_its_stored_offset_cannot_change_a_key_the_batch_wrote(tmp_path):
    # a task reading two co-partitioned topics, restarted: its records of one topic are
    # new, those of the other were applied already
    ctx = TableContext()
    counts = table("counts", ctx, default=int)
    task = open_task(tmp_path / "s", [counts])
    for offset in range(4):
        ctx.set_record(task, "payments", 0, offset, None)
        counts["k"] += 1
    task.drain().commit()
    task.close()
    task = open_task(tmp_path / "s", [counts])
    ctx.set_record(task, SRC, 0, 0, None)            # new: k = 4 + 1
    counts["k"] += 1
    for offset in (2, 3):                            # applied already: ignored
        ctx.set_record(task, "payments", 0, offset, None)
        counts["k"] += 1
        counts["k"] = 100
    assert counts["k"] == 5
    assert [(r.key, r.value) for r in task.drain().records] == [(b'"k"', b"5")]
    task.close()


@pytest.mark.timeout(20)
def test_batches_in_flight_stay_readable_and_commit_in_order(tmp_path):
    ctx = TableContext()
    counts = table("counts", ctx, default=int)
    task = open_task(tmp_path / "s", [counts])
    ctx.set_record(task, SRC, 0, 0, None)
    counts["k"] += 1
    first = task.drain()
    ctx.set_record(task, SRC, 0, 1, None)
    counts["k"] += 1  # reads batch 1 before it is committed
    second = task.drain()
    assert [r.value for r in second.records] == [b"2"]
    with pytest.raises(TableError):
        second.commit()
    first.commit()
    second.commit()
    assert task.store.get("counts", b'"k"') == b"2" and task.store.input_offset(SRC, 0) == 2
    # abort drops what is not committed
    ctx.set_record(task, SRC, 0, 2, None)
    counts["k"] += 1
    task.drain()
    task.abort()
    ctx.set_record(task, SRC, 0, 2, None)
    assert counts["k"] == 2
    task.close()


@pytest.mark.timeout(20)
def test_keys_that_compare_equal_in_python_stay_apart(tmp_path):
    """1, True, 1.0 and "1" are four JSON keys, whatever the serialized-key memo holds."""
    ctx = TableContext()
    things = table("things", ctx)
    task = open_task(tmp_path / "s", [things])
    ctx.set_record(task, SRC, 0, 0, 1_000_000)
    for key in (1, True, 1.0, "1", 1, "1"):
        things[key] = repr(key)
    batch = task.drain()
    assert sorted((r.key, r.value) for r in batch.records) == [
        (b'"1"', b'"\'1\'"'), (b"1", b'"1"'), (b"1.0", b'"1.0"'), (b"true", b'"True"')]
    task.close()


@pytest.mark.timeout(20)
def test_a_key_of_another_partition_is_written_and_warned_about_once(tmp_path, caplog):
    """Any upstream partitioner: nothing is refused for its partition; a foreign key
    under a murmur2-partitioned record warns once per table."""
    ctx = TableContext()
    counts = table("counts", ctx, default=int)
    encode_raw = get_codec("raw")[0]
    partitions = 4
    by_partition: Dict[int, str] = {}
    for i in range(100):
        by_partition.setdefault(partition_for(f"user-{i}".encode(), partitions), f"user-{i}")
    task = open_task(tmp_path / "s", [counts], partition=1,
                     key_partition=key_partitioner(encode_raw, partitions))
    # a record that a consistent_random producer put on partition 1: its own key is fine
    ctx.set_record(task, SRC, 1, 0, None, key=by_partition[3].encode())
    with caplog.at_level("WARNING", logger="shardworker.tables"):
        counts[by_partition[3]] += 1
        counts[42] = 1  # an int is not a raw key of the source topic: written all the same
        assert not caplog.records
        # a murmur2-partitioned record writing two keys of other tasks: one warning
        ctx.set_record(task, SRC, 1, 1, None, key=by_partition[1].encode())
        counts[by_partition[1]] += 1
        counts[by_partition[0]] += 1
        counts[by_partition[2]] += 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert f"key {by_partition[0]!r}" in warnings[0] and "partition 0" in warnings[0]
    keys = sorted(r.key for r in task.drain().records)
    assert keys == sorted([json.dumps(by_partition[n]).encode() for n in (0, 1, 2, 3)] + [b"42"])
    task.close()


T0 = 1_700_000_000_000  # a multiple of 10 s (epoch ms)


@pytest.mark.timeout(20)
def test_tumbling_windows_place_by_record_timestamp(tmp_path):
    ctx = TableContext()
    base = table("clicks", ctx, default=int)
    clicks = base.tumbling(10)
    task = open_task(tmp_path / "s", [base])
    events = [(T0 + 0, "a"), (T0 + 9_999, "a"), (T0 + 10_000, "a"), (T0 + 25_000, "b"),
              (T0 + 3_000, "b")]
    for offset, (ts, key) in enumerate(events):
        ctx.set_record(task, SRC, 0, offset, ts)
        clicks[key] += 1
        if offset == 1:
            assert clicks["a"].current() == 2 and clicks["a"].value() == 2
            assert clicks["a"].delta(10) == 0  # the window before is empty
    ctx.set_record(task, SRC, 0, 5, T0 + 10_500)
    assert clicks["a"].current() == 1 and clicks["a"].delta(10) == 2
    assert clicks["b"].delta(10.5) == 1  # T0 + 0 .. T0 + 10 s
    with pytest.raises(TableError):
        base["a"]  # a windowed table is used through its windowed view
    batch = task.drain()
    placed = {(json.loads(split_window_key(r.key)[1]), split_window_key(r.key)[0]):
              int(r.value) for r in batch.records}
    assert placed == {("a", T0): 2, ("a", T0 + 10_000): 1, ("b", T0 + 20_000): 1,
                      ("b", T0): 1}
    batch.commit()
    assert task.store.get("clicks", window_key(T0, b'"a"')) == b"2"
    ctx.set_record(task, SRC, 0, 6, T0 + 10_500)
    assert sorted(clicks.items()) == [
        (("a", (T0 / 1000, T0 / 1000 + 10)), 2), (("a", (T0 / 1000 + 10, T0 / 1000 + 20)), 1),
        (("b", (T0 / 1000, T0 / 1000 + 10)), 1), (("b", (T0 / 1000 + 20, T0 / 1000 + 30)), 1)]
    task.close()


@pytest.mark.timeout(20)
def test_hopping_windows_update_every_window_holding_the_timestamp(tmp_path):
    ctx = TableContext()
    base = table("views", ctx, default=int)
    views = base.hopping(10, 5)
    task = open_task(tmp_path / "s", [base])
    ctx.set_record(task, SRC, 0, 0, T0 + 12_000)  # in [T0+5, T0+15) and [T0+10, T0+20)
    views["p"] += 1
    ctx.set_record(task, SRC, 0, 1, T0 + 16_000)  # in [T0+10, T0+20) and [T0+15, T0+25)
    views["p"] += 10
    assert views["p"].current() == 10  # the latest window holding T0+16
    assert views["p"].delta(5) == 11  # T0+11: latest window [T0+10, T0+20)
    assert views["p"].delta(10) == 1  # T0+6: latest window [T0+5, T0+15)
    views["q"] = 7  # plain assignment sets every window of the timestamp
    batch = task.drain()
    placed = {(split_window_key(r.key)[1], split_window_key(r.key)[0] - T0): int(r.value)
              for r in batch.records}
    assert placed == {(b'"p"', 5_000): 1, (b'"p"', 10_000): 11, (b'"p"', 15_000): 10,
                      (b'"q"', 10_000): 7, (b'"q"', 15_000): 7}
    batch.commit()
    task.close()


@pytest.mark.timeout(20)
def test_expired_windows_become_tombstones_and_leave_lmdb(tmp_path):
    ctx = TableContext()
    base = table("hits", ctx, default=int)
    hits = base.tumbling(10, expires=20)
    task = open_task(tmp_path / "s", [base])
    for offset, ts in enumerate([T0 + 1_000, T0 + 11_000, T0 + 21_000]):
        ctx.set_record(task, SRC, 0, offset, ts)
        hits["k"] += 1
    task.drain().commit()
    assert task.store.count("hits") == 3
    # at T0+49.999 s [T0, T0+10) and [T0+10, T0+20) ended more than 20 s ago: expired,
    # they read as missing; [T0+20, T0+30) ended 19.999 s ago: still live
    ctx.set_record(task, SRC, 0, 3, T0 + 49_999)
    assert hits["k"].delta(40) == 0 and hits["k"].delta(30) == 0
    assert hits["k"].delta(20) == 1
    hits["k"] += 5
    ctx.set_record(task, SRC, 0, 4, T0 + 3_000)
    hits["k"] += 100  # a late record for an expired window changes nothing
    ctx.set_record(task, SRC, 0, 5, T0 + 50_000)  # now [T0+20, T0+30) expires too
    assert hits["k"].delta(20) == 0
    batch = task.drain()
    by_start = {split_window_key(r.key)[0] - T0: r.value for r in batch.records}
    assert by_start == {0: None, 10_000: None, 20_000: None, 40_000: b"5"}
    tombstone = next(r for r in batch.records if r.value is None)
    assert dict(tombstone.headers)[HDR_SRC_OFFSET] == b"5"
    batch.commit()
    assert [split_window_key(k)[0] - T0 for k, _ in task.store.items("hits")] == [40_000]
    task.close()
    # the task's stream time survives a restart: the next drain expires nothing new
    task = open_task(tmp_path / "s", [base])
    ctx.set_record(task, SRC, 0, 6, T0 + 50_000)
    assert hits["k"].current() == 0 and hits["k"].delta(1) == 5 and task.drain().records == []
    task.close()


@pytest.mark.timeout(20)
def test_a_failed_record_from_the_year_2100_does_not_move_stream_time():
    """A record the agent rejects (dead-lettered or skipped) is rolled back by the worker,
    stream time included: open windows do not expire.  Through the agent test driver, so
    the worker's own error path does the rollback."""
    app = shardworker.App("late", broker="kafka://127.0.0.1:9")
    hits_topic = app.topic("hits", key_serializer="str", value_serializer="json")
    hits = app.table("hits", default=int).tumbling(10, expires=20)

    @app.agent(hits_topic)
    def count(stream):  # type: ignore[no-untyped-def]
        for key, value in stream.items():
            hits[key] += 1
            if value == "fail":
                raise ValueError("rejected")  # after its write: the write is taken back

    with count.test_context() as agent:
        agent.put("ok", key="k", timestamp=T0 / 1000 + 1)
        agent.put("fail", key="k", timestamp=4_102_444_800.0)  # the year 2100
        agent.put("ok", key="k", timestamp=T0 / 1000 + 2)
        assert [str(f.error) for f in agent.dead_letters] == ["rejected"]
        # had the failed record moved stream time to 2100, [T0, T0 + 10 s) would be gone
        assert hits["k"].current() == 2 and hits["k"].delta(10) == 0
        assert [k for k, _v in hits.items()] == [("k", (T0 / 1000, T0 / 1000 + 10))]


# -- restore -------------------------------------------------------------------------------
def changelog_of(tmp_path, batches: List[List[Tuple[str, int]]]) -> List[Tuple[bytes, Optional[bytes], list]]:
    """Runs batches of (key, increment) records (one offset each) through a real task and
    returns the changelog records it produced, in order."""
    ctx = TableContext()
    counts = table("counts", ctx, default=int)
    task = open_task(tmp_path / "producer", [counts])
    records = []
    offset = 0
    for batch in batches:
        for key, inc in batch:
            ctx.set_record(task, SRC, 0, offset, None)
            if inc:
                counts[key] += inc
            else:
                del counts[key]
            offset += 1
        drained = task.drain()
        records.extend((r.key, r.value, r.headers) for r in drained.records)
        drained.commit()
    task.close()
    return records


@pytest.mark.timeout(30)
def test_restore_applies_only_batches_below_the_committed_offset_and_is_idempotent(tmp_path):
    batches = [[("a", 1), ("b", 1)],          # offsets 0-1 → src offset 1
               [("a", 1), ("c", 5)],          # offsets 2-3 → src offset 3
               [("b", 0), ("a", 1)],          # offsets 4-5 → src offset 5 (b deleted)
               [("a", 100), ("d", 1)]]        # offsets 6-7 → src offset 7
    records = changelog_of(tmp_path, batches)
    assert [int(dict(h)[HDR_SRC_OFFSET]) for _k, _v, h in records] == [1, 1, 3, 3, 5, 5, 7, 7]
    # the group committed 6: batch 4 (src offset 7) will be processed again
    store = TaskStore(str(tmp_path / "restored"), ["counts"])
    applied, skipped = apply_changelog(store, "counts", records, {(SRC, 0): 6}, batch_size=2,
                                       last_offset=7)
    assert (applied, skipped) == (6, 2)
    state = dict(store.items("counts"))
    assert state == {b'"a"': b"3", b'"c"': b"5"}
    assert store.input_offset(SRC, 0) == 6 and store.changelog_offset("counts") == 7
    # offset 5 committed means batch 3 (src offset 5) is NOT complete: at == committed skips
    assert apply_changelog(store, "counts", records, {(SRC, 0): 4})[0] == 4
    # applying the same changelog again (even after a partial one) gives the same state
    apply_changelog(store, "counts", records, {(SRC, 0): 6})
    apply_changelog(store, "counts", records, {(SRC, 0): 6})
    assert dict(store.items("counts")) == state and store.input_offset(SRC, 0) == 6
    # records without source headers, or of a partition without a committed offset: skipped
    assert apply_changelog(store, "counts", [(b'"z"', b"1", None)], {(SRC, 0): 6}) == (0, 1)
    assert apply_changelog(store, "counts", records, {(SRC, 1): 100})[0] == 0
    store.close()
    # the restored state carries on exactly where the group's committed offset is
    ctx = TableContext()
    counts = table("counts", ctx, default=int)
    task = open_task(tmp_path / "restored", [counts])
    ctx.set_record(task, SRC, 0, 5, None)
    counts["a"] += 1000  # below the restored position: ignored
    for offset, (key, inc) in enumerate(batches[3], start=6):
        ctx.set_record(task, SRC, 0, offset, None)
        counts[key] += inc
    assert counts["a"] == 103 and counts["d"] == 1 and "b" not in counts
    task.close()


@pytest.mark.timeout(30)
def test_stream_time_is_restored_from_the_changelog_so_expired_windows_stay_closed(tmp_path):
    """Failover: a task restored on another machine from the changelog alone knows the
    stream time its first owner had reached; a late record for a window that expired
    there does not reopen it."""
    ctx = TableContext()
    base = table("hits", ctx, default=int)
    hits = base.tumbling(10, expires=20)
    first = open_task(tmp_path / "first", [base])
    records = []
    for offset, ts in enumerate([T0 + 1_000, T0 + 45_000, T0 + 46_000]):
        ctx.set_record(first, SRC, 0, offset, ts)
        hits["k"] += 1
        drained = first.drain()
        records.extend((r.key, r.value, r.headers) for r in drained.records)
        drained.commit()
    first.close()
    # the window [T0, T0+10 s) expired at T0+30 s: its tombstone is in the changelog
    store = TaskStore(str(tmp_path / "second"), ["hits"])
    apply_changelog(store, "hits", records, {(SRC, 0): 3})
    store.close()
    second = open_task(tmp_path / "second", [base])
    assert second.latest_ms == T0 + 46_000
    ctx.set_record(second, SRC, 0, 3, T0 + 2_000)  # late, for the expired window
    hits["k"] += 1
    assert hits["k"].current() == 0
    assert second.drain().records == []
    second.close()
    # a batch that is processed again (source offset not committed) does not count
    store = TaskStore(str(tmp_path / "third"), ["hits"])
    apply_changelog(store, "hits", records, {(SRC, 0): 2})
    assert store.get_meta("latest_timestamp_ms") == struct.pack(">q", T0 + 45_000)
    store.close()


@pytest.mark.timeout(300)
def test_restore_speed_on_a_million_records(tmp_path, capsys):
    n = 1_000_000
    topic = SRC.encode()
    records = []
    for i in range(n):
        headers = [(HDR_SRC_TOPIC, topic), (HDR_SRC_PARTITION, b"0"),
                   (HDR_SRC_OFFSET, b"%d" % (i // 100))]
        records.append((b'"user-%07d"' % (i * 7919 % n), b"%d" % i, headers))
    store = TaskStore(str(tmp_path / "s"), ["counts"], sync=True)
    start = time.perf_counter()
    applied, skipped = apply_changelog(store, "counts", records, {(SRC, 0): (n // 100) - 10})
    elapsed = time.perf_counter() - start
    assert applied + skipped == n and skipped == 1000
    assert store.count("counts") == applied and store.input_offset(SRC, 0) == n // 100 - 10
    with capsys.disabled():
        print(f"\napply_changelog: {n:,} records in {elapsed:.2f}s = {n / elapsed:,.0f} records/s "
              f"(map grew to {store.map_size >> 20} MiB)")
    store.close()


@pytest.mark.timeout(10)
def test_an_interrupted_restore_keeps_the_stream_time_of_what_it_applied(tmp_path):
    """A restore stopped after its first write transaction (revoke, kill) keeps the stream
    time of the records it applied with them, not only at its end: a restore finished
    later with older records must not leave the task with an older stream time."""
    ctx = TableContext()
    base = table("hits", ctx, default=int)
    task = open_task(tmp_path / "first", [base])
    records = []
    for offset, ts in enumerate([T0 + 1_000, T0 + 45_000, T0 + 46_000]):
        ctx.set_record(task, SRC, 0, offset, ts)
        base[f"k{offset}"] = 1
        drained = task.drain()
        records.extend((r.key, r.value, r.headers) for r in drained.records)
        drained.commit()
    task.close()

    def interrupted():
        yield from records[:2]
        raise RuntimeError("revoked")

    store = TaskStore(str(tmp_path / "second"), ["hits"])
    with pytest.raises(RuntimeError):
        apply_changelog(store, "hits", interrupted(), {(SRC, 0): 3}, batch_size=2)
    assert store.get_meta("latest_timestamp_ms") == struct.pack(">q", T0 + 45_000)
    store.close()


@pytest.mark.timeout(20)
def test_a_batch_ends_writes_name_a_partition_of_the_batch_when_no_record_set_one(tmp_path):
    """The worker's records reach a batch through its positions at the drain (no
    record's ``pending`` offset): a write the batch end itself makes (closing or expiring
    windows) carries a partition of that batch, not a placeholder."""
    ctx = TableContext()
    task = open_task(tmp_path / "s", [table("t", ctx)])
    sources = []
    task._close = lambda: (sources.append(task._batch_source()), [])[1]  # type: ignore[method-assign]
    task.drain({(SRC, 3): 5})
    assert sources == [(SRC, 3)]
    task.close()
