"""Unit tests of windows and time (DESIGN.md, "Windows and time"): event time from the
value, grace and late records, final records when a window closes (order, content, once
per window across a reopen, again after a batch that never committed, never again after
a restore from the changelog), and aggregates of JSON values.  Real LMDB in tmp_path;
the agent test driver for the worker's path (decode, event time, dead letters)."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, List

import pytest

import shardworker
from shardworker.changelog import HDR_STREAM_TIME
from shardworker.restore import apply_changelog
from shardworker.store import TaskStore
from shardworker.tables import Table
from shardworker.tablecontext import TableContext
from shardworker.tasktables import TaskTables
from shardworker.windowclose import LateRecordError
from shardworker.windows import Window, event_time_ms, split_window_key, window_key

SRC = "orders"
T0 = 1_700_000_000_000  # a multiple of 10 s (epoch ms)
S0 = T0 / 1000


def open_task(path: Any, tables: List[Table]) -> TaskTables:
    store = TaskStore(str(path), [t.name for t in tables])
    return TaskTables(store, tables, 0, SRC, None, task_id="0_0")


def app_and_sink() -> Any:
    app = shardworker.App("win", broker="kafka://127.0.0.1:9")
    return app, app.topic("finals", key_serializer="json", value_serializer="json")


def finals_of(batch: Any) -> List[Any]:
    return [(json.loads(f.key), json.loads(f.value)) for f in batch.finals]


# -- the window arithmetic -----------------------------------------------------------------
@pytest.mark.timeout(10)
def test_grace_closes_a_window_at_its_end_plus_grace_and_expires_must_cover_it():
    w = Window(10, 10, grace=5)
    assert not w.closed(0, 14_999) and w.closed(0, 15_000)
    assert w.close_bound(15_000) == 1 and w.close_bound(14_999) == 0 and w.close_bound(None) == 0
    assert Window(10, 10, expires=20).close_after_ms == 20_000  # no grace: closes on expiry
    assert Window(10, 10).close_after_ms is None and not Window(10, 10).closed(0, 10 ** 12)
    with pytest.raises(ValueError, match="expires must be at least grace"):
        Window(10, 10, expires=1, grace=5)
    with pytest.raises(ValueError):
        Table("t", app_id="a").tumbling(10, on_late="later")


@pytest.mark.timeout(10)
def test_event_time_is_seconds_or_a_datetime():
    assert event_time_ms(S0 + 1.5) == T0 + 1_500
    assert event_time_ms(datetime.fromtimestamp(S0, timezone.utc)) == T0
    assert event_time_ms(datetime.utcfromtimestamp(S0)) == T0  # naive: UTC
    for bad in (None, "1700000000", True, -1, float("nan")):
        with pytest.raises(ValueError):
            event_time_ms(bad)


# -- grace and late records ----------------------------------------------------------------
@pytest.mark.timeout(20)
def test_a_record_for_a_closed_window_is_late_counted_and_not_added(tmp_path):
    ctx = TableContext()
    base = Table("hits", app_id="app", context=ctx, default=int)
    hits = base.tumbling(10, grace=5)
    task = open_task(tmp_path / "s", [base])
    ctx.set_record(task, SRC, 0, 0, T0 + 1_000)
    hits["k"] += 1
    ctx.set_record(task, SRC, 0, 1, T0 + 14_999)  # [T0, T0+10) is open until T0+15
    ctx.set_record(task, SRC, 0, 2, T0 + 2_000)   # out of order, within grace: added
    hits["k"] += 1
    ctx.set_record(task, SRC, 0, 3, T0 + 15_000)  # closes [T0, T0+10)
    hits["k"] += 10
    ctx.set_record(task, SRC, 0, 4, T0 + 3_000)   # late
    hits["k"] += 100
    hits["k"] += 100  # counted once per record
    assert hits["k"].current() == 2  # the closed window reads as it closed (not expired)
    assert task.late == {"hits": 1} and base.late_count == 1 and hits.late_records() == 1
    values = {split_window_key(r.key)[0] - T0: int(r.value) for r in task.drain().records}
    assert values == {0: 2, 10_000: 10}
    task.close()


@pytest.mark.timeout(30)
def test_event_time_comes_from_the_value_and_late_records_can_be_dead_lettered():
    """Through the agent test driver (the worker's own path): windows follow the value's
    ``ts`` field, not the Kafka timestamp; a value without one is dead-lettered like a
    decode error (here the agent's policy, ``skip``); with ``on_late="dlq"`` a late
    record is dead-lettered whatever the agent's policy, and its writes to open windows
    are taken back."""
    app, _sink = app_and_sink()
    clicks = app.topic("clicks", key_serializer="str", timestamp=lambda v: v["ts"])
    per10 = app.table("per10", default=int).hopping(10, 5, grace=2, on_late="dlq")

    @app.agent(clicks, on_error="skip")
    def tally(stream):  # type: ignore[no-untyped-def]
        for page, value in stream.items():
            per10[page] += value["n"]
            yield per10[page].current()

    with tally.test_context() as agent:
        agent.put({"ts": S0 + 1, "n": 1}, key="p", timestamp=S0 + 500)
        agent.put({"ts": S0 + 6, "n": 2}, key="p", timestamp=S0 - 500)
        assert agent.results == [1, 2]  # [T0+5, T0+15) holds only the second
        assert per10["p"].delta(5) == 3  # [T0, T0+10): both
        agent.put({"n": 3}, key="p")  # no event time: a bad record, nothing changes
        assert [type(f.error) for f in agent.skipped] == [KeyError]
        agent.put({"ts": S0 + 12, "n": 1}, key="p")  # stream time T0+12 closes [T0-5, T0+5)
        # T0+4 is in [T0-5, T0+5) (closed) and [T0, T0+10) (open): late, dead-lettered,
        # and its write to the open window is taken back with it
        agent.put({"ts": S0 + 4, "n": 50}, key="p")
        [letter] = agent.dead_letters
        assert isinstance(letter.error, LateRecordError)
        assert letter.headers["shardsup.error"].startswith(b"LateRecordError")
        assert per10["p"].current() == 3  # [T0, T0+10) as before the late record
        assert agent.results == [1, 2, 1]  # T0+12: [T0+10, T0+20)


# -- final records -------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_closing_windows_emit_their_final_values_once_in_start_then_key_order(tmp_path):
    app, sink = app_and_sink()
    ctx = TableContext()
    base = Table("sums", app_id="win", context=ctx, default=int)
    sums = base.tumbling(10, grace=5).on_close(sink)
    assert base.window is not None and base.window.expires_ms == 5_000  # deleted on close
    task = open_task(tmp_path / "s", [base])
    for offset, (ts, key, n) in enumerate([(T0 + 1_000, "b", 1), (T0 + 2_000, "a", 2),
                                           (T0 + 11_000, "a", 4), (T0 + 9_000, "b", 8)]):
        ctx.set_record(task, SRC, 0, offset, ts)
        sums[key] += n
    batch = task.drain()
    assert batch.finals == []  # stream time T0+11: nothing closed yet
    batch.commit()
    ctx.set_record(task, SRC, 0, 4, T0 + 25_000)  # closes [T0, T0+10) and [T0+10, T0+20)
    sums["c"] += 16
    batch = task.drain()
    assert finals_of(batch) == [
        ("a", {"start": S0, "end": S0 + 10, "value": 2}),
        ("b", {"start": S0, "end": S0 + 10, "value": 9}),
        ("a", {"start": S0 + 10, "end": S0 + 20, "value": 4})]
    assert all(f.topic == "finals" for f in batch.finals)
    # the closed windows expire with the batch (expires defaults to grace)
    assert sorted(split_window_key(r.key)[0] - T0 for r in batch.records
                  if r.value is None) == [0, 0, 10_000]
    batch.commit()
    ctx.set_record(task, SRC, 0, 5, T0 + 26_000)
    sums["c"] += 1
    assert task.drain().finals == []  # never twice
    task.close()


@pytest.mark.timeout(20)
def test_the_windows_a_batch_closed_are_derived_again_after_a_crash_never_after_a_commit(tmp_path):
    """The close watermark is stream time, stored with the state: a reopen after the
    commit emits nothing again; a batch that never committed (a crash, at least once)
    closes the same windows again when its records are processed again; a task
    restored from the changelog alone (a failover) knows what its last batch closed,
    even when that batch wrote no window (each closed window is written again, so a
    changelog record carries the batch's stream time)."""
    app, sink = app_and_sink()
    ctx = TableContext()
    base = Table("sums", app_id="win", context=ctx, default=int)
    sums = base.tumbling(10, grace=0, expires=100).on_close(sink)
    task = open_task(tmp_path / "s", [base])
    ctx.set_record(task, SRC, 0, 0, T0 + 1_000)
    sums["a"] += 5
    first = task.drain()
    first.commit()
    ctx.set_record(task, SRC, 0, 1, T0 + 10_000)  # closes [T0, T0+10); writes nothing
    lost = task.drain()
    assert finals_of(lost) == [("a", {"start": S0, "end": S0 + 10, "value": 5})]
    task.abort()  # the batch failed before its commit: read again
    ctx.set_record(task, SRC, 0, 1, T0 + 10_000)
    batch = task.drain()
    assert finals_of(batch) == finals_of(lost)
    # the closed window is written again with the batch's stream time
    [rewrite] = batch.records
    assert rewrite.key == window_key(T0, b'"a"') and rewrite.value == b"5"
    assert dict(rewrite.headers)[HDR_STREAM_TIME] == b"%d" % (T0 + 10_000)
    batch.commit()
    task.close()
    task = open_task(tmp_path / "s", [base])  # a restart: nothing closes again
    ctx.set_record(task, SRC, 0, 2, T0 + 10_500)
    assert task.drain().finals == []
    task.close()
    # a failover: a fresh store restored from the changelog records alone
    restored = TaskStore(str(tmp_path / "r"), ["sums"])
    records = [(r.key, r.value, r.headers) for r in first.records + batch.records]
    apply_changelog(restored, "sums", records, {(SRC, 0): 2})
    restored.close()
    task = open_task(tmp_path / "r", [base])
    ctx.set_record(task, SRC, 0, 2, T0 + 10_500)
    assert task.drain().finals == []
    task.close()


@pytest.mark.timeout(30)
def test_on_close_callbacks_send_what_they_yield_through_the_driver():
    app, sink = app_and_sink()
    clicks = app.topic("clicks", key_serializer="str", timestamp=lambda v: v["ts"])
    seen: List[Any] = []

    def closed(key, window, value):  # type: ignore[no-untyped-def]
        seen.append((key, window, value))
        if value["n"]:
            yield {"page": key, "mean": value["sum"] / value["n"], "from": window[0]}

    stats = app.table("stats", default=lambda: {"n": 0, "sum": 0}).tumbling(
        10, grace=1).on_close(closed, sink=sink)

    @app.agent(clicks)
    def tally(stream):  # type: ignore[no-untyped-def]
        for page, value in stream.items():
            stats[page].apply(lambda a: {"n": a["n"] + 1, "sum": a["sum"] + value["x"]})
            yield value

    with tally.test_context() as agent:
        for ts, x in [(1, 2), (5, 4), (10.5, 100), (11, 1)]:
            agent.put({"ts": S0 + ts, "x": x}, key="home")
        assert seen == [("home", (S0, S0 + 10), {"n": 2, "sum": 6})]
        finals = [o for o in agent.outputs if o.topic == "finals"]
        assert [(o.key, o.value) for o in finals] == [
            ("home", {"page": "home", "mean": 3.0, "from": S0})]


@pytest.mark.timeout(30)
def test_a_final_record_too_large_to_send_is_dropped_with_a_log_line_not_a_crash_loop(caplog):
    app, sink = app_and_sink()
    clicks = app.topic("clicks", key_serializer="str", timestamp=lambda v: v["ts"])

    def closed(key, window, value):  # type: ignore[no-untyped-def]
        yield {"page": key, "padding": "x" * 2_000_000}  # over message.max.bytes

    counts = app.table("counts", default=int).tumbling(10, grace=0).on_close(closed, sink=sink)

    @app.agent(clicks)
    def tally(stream):  # type: ignore[no-untyped-def]
        for page, _value in stream.items():
            counts[page] += 1
            yield page

    with tally.test_context() as agent:
        agent.put({"ts": S0 + 1}, key="home")
        agent.put({"ts": S0 + 12}, key="home")   # closes [S0, S0+10): its final is too large
        agent.put({"ts": S0 + 13}, key="home")   # and the task goes on
        assert counts["home"].current() == 2
        assert not [o for o in agent.outputs if o.topic == "finals"]
    assert any("final record of a window" in r.getMessage() for r in caplog.records)


# -- aggregates ----------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_json_aggregates_update_through_the_write_cache_by_reassignment(tmp_path):
    app, sink = app_and_sink()
    ctx = TableContext()
    base = Table("agg", app_id="win", context=ctx, default=lambda: {"n": 0, "min": None})
    agg = base.hopping(10, 5, grace=0).on_close(sink)
    task = open_task(tmp_path / "s", [base])
    for offset, (ts, x) in enumerate([(1_000, 7), (6_000, 3), (8_000, 9)]):
        ctx.set_record(task, SRC, 0, offset, T0 + ts)
        agg["k"].apply(lambda a: {"n": a["n"] + 1,
                                  "min": x if a["min"] is None else min(a["min"], x)})
    current = agg["k"].current()
    current["n"] += 1000  # a copy: mutating what was read changes nothing stored
    assert agg["k"].current() == {"n": 2, "min": 3}  # [T0+5, T0+15)
    assert agg["k"].delta(5) == {"n": 3, "min": 3}  # [T0, T0+10)
    agg["k"] = {"n": 0, "min": None}  # plain assignment: every window of the record
    assert agg["k"].current() == agg["k"].delta(5) == {"n": 0, "min": None}
    lists = Table("seen", app_id="win", context=ctx, default=list)
    seen = lists.tumbling(10)
    task2 = open_task(tmp_path / "s2", [lists])
    ctx.set_record(task2, SRC, 0, 0, T0 + 1_000)
    seen["k"] += [1]
    seen["k"] += [2]
    assert seen["k"].current() == [1, 2]
    task.close()
    task2.close()


@pytest.mark.timeout(30)
def test_a_re_keyed_record_carries_the_event_time_extracted_from_its_source():
    app, _sink = app_and_sink()
    orders = app.topic("orders", partitions=2, key_serializer="str",
                       timestamp=lambda v: datetime.fromtimestamp(v["at"], timezone.utc))
    per_customer = app.table("per_customer", default=int).tumbling(10)

    @app.agent(orders)
    def spend(stream):  # type: ignore[no-untyped-def]
        for order in stream.group_by(lambda o: o["customer"], name="by-customer"):
            per_customer[order["customer"]] += order["amount"]
            yield per_customer[order["customer"]].current()

    with spend.test_context() as agent:
        agent.put({"at": S0 + 1, "customer": "c", "amount": 2}, key="o1", timestamp=S0 + 99)
        agent.put({"at": S0 + 12, "customer": "c", "amount": 3}, key="o2", timestamp=S0 + 5)
        assert agent.results == [2, 3]  # [T0, T0+10) then [T0+10, T0+20), by "at"
        assert per_customer["c"].delta(12) == 2
