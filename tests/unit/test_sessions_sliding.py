"""Unit tests of session and sliding windows (DESIGN.md, "Windows and time"): sessions
formed, extended, merged by a bridging record (across a drain, across a reopen of the
store, after a batch that never committed, after a restore from the changelog alone),
closed with their exact final values, late records; a failed record's merge taken back;
``merge=`` for values that are not numbers; sliding windows against the README's worked
example.  Real LMDB in tmp_path; the agent test driver for the worker's path."""
from __future__ import annotations

import json
from typing import Any, List, Tuple

import pytest

import shardworker
from shardworker.restore import apply_changelog
from shardworker.sessions import SessionWindows, TimeKeyedLayout, sum_merge
from shardworker.store import TaskStore
from shardworker.tables import Table
from shardworker.tablecontext import TableContext, TableError
from shardworker.tasktables import TaskTables

SRC = "orders"
T0 = 1_700_000_000_000  # a multiple of 10 s (epoch ms)
S0 = T0 / 1000


def open_task(path: Any, tables: List[Table]) -> TaskTables:
    store = TaskStore(str(path), [t.name for t in tables])
    return TaskTables(store, tables, 0, SRC, None, task_id="0_0")


def app_and_sink() -> Any:
    app = shardworker.App("win", broker="kafka://127.0.0.1:9")
    return app, app.topic("finals", key_serializer="json", value_serializer="json")


def finals_of(batch: Any) -> List[Tuple[Any, Any]]:
    return [(json.loads(f.key), json.loads(f.value)) for f in batch.finals]


def final(key: str, start: float, end: float, value: Any) -> Tuple[str, Any]:
    return key, {"start": S0 + start, "end": S0 + end, "value": value}


def session_table(ctx: TableContext, sink: Any, **kw: Any) -> Tuple[Table, Any]:
    base = Table("sess", app_id="win", context=ctx, default=int)
    return base, base.session(10, **kw).on_close(sink)


# -- sessions --------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_session_arguments_and_the_default_merge():
    assert SessionWindows(10, grace=5).expires_ms == 5_000  # deleted when it closes
    with pytest.raises(ValueError):
        SessionWindows(0)
    with pytest.raises(ValueError, match="expires must be at least grace"):
        SessionWindows(10, grace=5, expires=1)
    assert sum_merge(2, 3.5) == 5.5
    with pytest.raises(TableError, match="merge="):
        sum_merge({"n": 1}, {"n": 2})
    t = Table("t", app_id="a")
    t.session(10)
    with pytest.raises(TableError, match="windowed already"):
        t.sliding(10)


@pytest.mark.timeout(20)
def test_the_readme_session_example_forms_merges_and_closes_sessions(tmp_path):
    """README, "Session windows": gap 10 s, grace 20 s, one batch per record."""
    _app, sink = app_and_sink()
    ctx = TableContext()
    base, sess = session_table(ctx, sink, grace=20)
    task = open_task(tmp_path / "s", [base])
    seen = []
    finals: List[Any] = []
    for offset, (ts, n) in enumerate([(0, 1), (5, 2), (22, 4), (14, 8), (60, 1), (29, 100)]):
        ctx.set_record(task, SRC, 0, offset, T0 + ts * 1000)
        sess["k"] += n
        seen.append((sess["k"].window(), sess["k"].current()))
        batch = task.drain()
        finals += finals_of(batch)
        batch.commit()
    assert seen == [((S0, S0), 1), ((S0, S0 + 5), 3), ((S0 + 22, S0 + 22), 4),
                    ((S0, S0 + 22), 15),  # 14 bridges [0, 5] and [22, 22]: 3 + 4, then + 8
                    ((S0 + 60, S0 + 60), 1),
                    (None, 0)]  # 29 + 20 < 60: late, not added
    assert finals == [final("k", 0, 22, 15)]  # closed at 22 + 10 + 20 <= 60
    assert task.late == {"sess": 1} and sess.late_records() == 1
    # the closed session was deleted (expires defaults to grace)
    assert list(sess.items()) == [(("k", (S0 + 60, S0 + 60)), 1)]
    # what `shardsup table` shows: the stored sessions of LMDB
    assert TimeKeyedLayout.stored(iter(task.store.items("sess"))) == [
        (b'"k"', T0 + 60_000, T0 + 60_000, b"1")]
    task.close()


@pytest.mark.timeout(20)
def test_sessions_of_keys_are_apart_and_close_in_end_then_key_order(tmp_path):
    _app, sink = app_and_sink()
    ctx = TableContext()
    base, sess = session_table(ctx, sink)  # grace 0: only in-order records count
    task = open_task(tmp_path / "s", [base])
    for offset, (ts, key, n) in enumerate([(0, "b", 1), (1, "a", 2), (9, "a", 4), (10, "b", 8),
                                           (19, "b", 16), (29, "c", 32)]):
        ctx.set_record(task, SRC, 0, offset, T0 + ts * 1000)
        sess[key] += n
    assert finals_of(task.drain()) == [  # end + 10 <= 29
        final("b", 0, 0, 1), final("a", 1, 9, 6), final("b", 10, 19, 24)]
    task.close()


@pytest.mark.timeout(20)
def test_a_merge_across_a_drain_and_across_a_reopen_is_exact(tmp_path):
    """The sessions a record bridges may be committed (LMDB), in flight (drained, not
    committed) or in the write cache; a reopen (a restart) finds them in LMDB."""
    _app, sink = app_and_sink()
    ctx = TableContext()
    base, sess = session_table(ctx, sink, grace=30)
    task = open_task(tmp_path / "s", [base])
    ctx.set_record(task, SRC, 0, 0, T0)
    sess["k"] += 1
    task.drain().commit()  # [0, 0] in LMDB
    ctx.set_record(task, SRC, 0, 1, T0 + 18_000)
    sess["k"] += 2
    in_flight = task.drain()  # [18, 18] in flight
    ctx.set_record(task, SRC, 0, 2, T0 + 9_000)  # bridges both
    sess["k"] += 4
    assert sess["k"].window() == (S0, S0 + 18) and sess["k"].current() == 7
    in_flight.commit()
    task.drain().commit()
    task.close()
    task = open_task(tmp_path / "s", [base])  # a restart
    ctx.set_record(task, SRC, 0, 3, T0 + 27_000)  # joins [0, 18]
    sess["k"] += 8
    ctx.set_record(task, SRC, 0, 4, T0 + 45_000)  # a new session
    sess["k"] += 16
    assert sess["k"].current() == 16
    task.drain().commit()
    ctx.set_record(task, SRC, 0, 5, T0 + 36_000)  # bridges [0, 27] and [45, 45]
    sess["k"] += 32
    assert (sess["k"].window(), sess["k"].current()) == ((S0, S0 + 45), 63)
    task.drain().commit()
    ctx.set_record(task, SRC, 0, 6, T0 + 200_000)
    assert finals_of(task.drain()) == [final("k", 0, 45, 63)]
    task.close()


@pytest.mark.timeout(20)
def test_a_merge_is_redone_after_a_crash_and_restored_from_the_changelog_alone(tmp_path):
    """A batch that never committed (kill -9) is processed again from the stored state:
    the same merge, the same final record; a task restored from the changelog records
    (whole values: the merged sessions' deletions, the merged session) has the same
    sessions and closes nothing twice."""
    _app, sink = app_and_sink()
    ctx = TableContext()
    base, sess = session_table(ctx, sink, grace=30)
    task = open_task(tmp_path / "s", [base])
    committed = []
    for offset, ts in enumerate([0, 18]):
        ctx.set_record(task, SRC, 0, offset, T0 + ts * 1000)
        sess["k"] += 1
    batch = task.drain()
    batch.commit()
    committed += batch.records

    def bridge() -> Any:
        ctx.set_record(task, SRC, 0, 2, T0 + 9_000)
        sess["k"] += 10
        ctx.set_record(task, SRC, 0, 3, T0 + 60_000)  # closes [0, 18]
        sess["j"] += 1
        return task.drain()

    lost = bridge()
    assert finals_of(lost) == [final("k", 0, 18, 12)]
    task.abort()  # the crash: nothing of that batch is stored
    batch = bridge()
    assert finals_of(batch) == finals_of(lost)
    batch.commit()
    committed += batch.records
    task.close()
    restored = TaskStore(str(tmp_path / "r"), ["sess"])
    apply_changelog(restored, "sess", [(r.key, r.value, r.headers) for r in committed],
                    {(SRC, 0): 4})
    restored.close()
    for path in ("s", "r"):
        store = TaskStore(str(tmp_path / path), ["sess"])
        entries = dict(store.items("sess"))
        store.close()
        assert [k[:1] for k in sorted(entries)] == [b"D", b"S", b"T"]  # only j's session
        task = open_task(tmp_path / path, [base])
        ctx.set_record(task, SRC, 0, 4, T0 + 61_000)
        assert task.drain().finals == []  # never twice
        task.close()


@pytest.mark.timeout(30)
def test_sessions_through_the_driver_with_a_merge_function_and_rollback():
    """``merge=`` combines JSON values; a record that fails after joining a session
    (here the agent raises; ``on_error="skip"``) takes its merge back."""
    app, sink = app_and_sink()
    clicks = app.topic("clicks", key_serializer="str", timestamp=lambda v: v["ts"])

    def merge(a: Any, b: Any) -> Any:
        return {"n": a["n"] + b["n"], "pages": a["pages"] + b["pages"]}

    visits = app.table("visits", default=lambda: {"n": 0, "pages": []}).session(
        10, grace=30, merge=merge).on_close(sink)

    @app.agent(clicks, on_error="skip")
    def track(stream):  # type: ignore[no-untyped-def]
        for user, value in stream.items():
            visits[user].apply(lambda a: {"n": a["n"] + 1, "pages": a["pages"] + [value["p"]]})
            if value["p"] == "boom":
                raise RuntimeError("boom")
            yield visits[user].window()

    with track.test_context() as agent:
        for ts, page in [(0, "a"), (15, "b"), (30, "c"), (22, "boom"), (8, "d")]:
            agent.put({"ts": S0 + ts, "p": page}, key="u")
        assert agent.results == [(S0, S0), (S0 + 15, S0 + 15), (S0 + 30, S0 + 30),
                                 (S0, S0 + 15)]  # 8 bridges [0, 0] and [15, 15]
        assert len(agent.skipped) == 1  # 22 failed: [15, 15] and [30, 30] stay apart
        agent.put({"ts": S0 + 100, "p": "e"}, key="u")
        finals = [(o.key, o.value) for o in agent.outputs if o.topic == "finals"]
        assert finals == [
            ("u", {"start": S0, "end": S0 + 15, "value": {"n": 3, "pages": ["a", "b", "d"]}}),
            ("u", {"start": S0 + 30, "end": S0 + 30, "value": {"n": 1, "pages": ["c"]}})]


# -- sliding windows -------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_the_readme_sliding_example_through_the_driver():
    """README, "Sliding windows": size 10 s, grace 5 s, key ``k``."""
    app, sink = app_and_sink()
    points = app.topic("points", key_serializer="str", timestamp=lambda v: v["ts"])
    slide = app.table("slide", default=int).sliding(10, grace=5).on_close(sink)

    @app.agent(points)
    def add(stream):  # type: ignore[no-untyped-def]
        for key, value in stream.items():
            slide[key] += value["x"]
            yield slide[key].current()

    with add.test_context() as agent:
        for ts, x in [(1, 1), (4, 2), (12, 4), (8, 8), (30, 16), (22, 32), (26, 64), (40, 1)]:
            agent.put({"ts": S0 + ts, "x": x}, key="k")
        assert agent.results == [1, 3, 6, 11, 16, 0, 64, 17]  # 22 is late: not added
        assert slide.late_records() == 1
        finals = [(o.key, o.value) for o in agent.outputs if o.topic == "finals"]
        assert finals == [final("k", -9, 1, 1), final("k", -6, 4, 3), final("k", -2, 8, 11),
                          final("k", 2, 12, 14), final("k", 16, 26, 64),
                          final("k", 20, 30, 80)]


@pytest.mark.timeout(20)
def test_sliding_buckets_are_deleted_once_no_open_window_holds_them(tmp_path):
    _app, sink = app_and_sink()
    ctx = TableContext()
    base = Table("slide", app_id="win", context=ctx, default=int)
    slide = base.sliding(10, grace=0).on_close(sink)
    task = open_task(tmp_path / "s", [base])
    for offset, ts in enumerate([0, 5, 10, 11]):
        ctx.set_record(task, SRC, 0, offset, T0 + ts * 1000)
        slide["k"] += 1
    assert slide["k"].current() == 3  # [1, 11]: 5, 10, 11
    batch = task.drain()
    assert finals_of(batch) == [final("k", -10, 0, 1), final("k", -5, 5, 2),
                                final("k", 0, 10, 3)]
    # the bucket at 0 is in no open window (0 + 10 + 0 < 11): deleted
    deleted = [r.key for r in batch.records if r.value is None]
    assert base.window.layout.value_key(b'"k"', T0) in deleted
    batch.commit()
    task.close()


@pytest.mark.timeout(10)
def test_the_graph_finds_the_session_and_sliding_tables_an_agent_uses():
    from shardworker.graph import scan_agent

    app = shardworker.App("g", broker="kafka://127.0.0.1:9")
    src = app.topic("src")
    sess = app.table("s1", default=int).session(10)
    slide = app.table("s2", default=int).sliding(10)

    @app.agent(src)
    def use(stream):  # type: ignore[no-untyped-def]
        for _value in stream:
            sess["k"] += 1
            slide["k"] += 1

    assert [t.name for t in scan_agent(app, use).tables] == ["s1", "s2"]
