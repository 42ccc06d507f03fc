"""Origins (shardworker/origins.py): what the app sends to its own topics is applied once
by a task with tables, across a replay, an abort, a restart and a restore.  Pure logic
over a real LMDB store; no broker."""
from __future__ import annotations

import pytest

from shardworker.origins import (HDR_ORIGIN, HDR_ORIGINS, OriginMarks, OriginStamper,
                                 decode_marks, origin_of, parse_origin)
from shardworker.restore import apply_changelog
from shardworker.store import TaskStore
from tests.unit.test_tables_units import open_task, table
from shardworker.tablecontext import TableContext

pytestmark = pytest.mark.timeout(10)

REPARTITION = "app-by-customer-repartition"


def test_the_stamper_numbers_the_records_sent_for_one_source_record():
    stamper = OriginStamper()
    first = [stamper.header("split", "lines", 2, 40) for _ in range(3)]
    assert [parse_origin(v) for _n, v in first] == [("split|lines|2", (40, s)) for s in range(3)]
    assert all(name == HDR_ORIGIN for name, _v in first)
    assert parse_origin(stamper.header("split", "lines", 2, 41)[1]) == ("split|lines|2", (41, 0))
    # another agent's sends for the same source record are numbered on their own
    assert parse_origin(stamper.header("other", "lines", 2, 41)[1]) == ("other|lines|2", (41, 0))
    assert origin_of([("x", b"1"), first[1]]) == ("split|lines|2", (40, 1))
    assert origin_of(None) is None and parse_origin(b"garbage") is None


def test_marks_skip_what_was_seen_and_forget_what_was_aborted():
    marks = OriginMarks({"a|t|0": (10, 2)})
    assert not marks.admit("a|t|0", (10, 2))      # committed already
    assert not marks.admit("a|t|0", (9, 7))
    assert marks.admit("a|t|0", (10, 3))
    assert not marks.admit("a|t|0", (10, 3))      # a replay within the batch
    assert marks.admit("a|t|1", (0, 0))           # another upstream partition
    batch = marks.drain()
    assert batch == {"a|t|0": (10, 3), "a|t|1": (0, 0)}
    assert marks.admit("a|t|0", (11, 0))
    marks.abort()                                 # neither batch committed
    assert marks.admit("a|t|0", (10, 3))          # read again, applied again
    marks.commit(batch)
    assert marks.committed == {"a|t|0": (10, 3), "a|t|1": (0, 0)}


def test_a_task_keeps_its_marks_with_its_state_and_in_its_changelog(tmp_path):
    ctx = TableContext()
    counts = table("counts", ctx, default=int)
    task = open_task(tmp_path / "s", [counts])
    assert task.origins.admit("spend|orders|1", (7, 0))
    ctx.set_record(task, REPARTITION, 0, 0, 1)
    counts["c1"] += 1
    counts["c2"] += 1
    batch = task.drain({(REPARTITION, 0): 1})
    # every mark so far rides on the batch's first changelog record only
    assert [HDR_ORIGINS in dict(r.headers) for r in batch.records] == [True, False]
    assert decode_marks(dict(batch.records[0].headers)[HDR_ORIGINS]) == {"spend|orders|1": (7, 0)}
    batch.commit({"counts": 0})
    task.close()
    reopened = open_task(tmp_path / "s", [counts])
    assert not reopened.origins.admit("spend|orders|1", (7, 0))  # after a restart too
    reopened.close()
    # a new owner restoring from the changelog skips it as well
    fresh = TaskStore(str(tmp_path / "fresh"), ["counts"])
    apply_changelog(fresh, "counts", [(r.key, r.value, r.headers) for r in batch.records],
                    {(REPARTITION, 0): 1}, last_offset=0)
    assert fresh.origin_marks() == {"spend|orders|1": (7, 0)}
    fresh.close()


def test_a_record_that_failed_to_decode_does_not_take_back_the_previous_records_writes(tmp_path):
    """The worker rolls back the failed record's writes; a record that failed before it
    reached an agent (its value did not decode) wrote nothing, and the record in hand
    is an earlier one whose writes stand."""
    from shardworker.state import TaskStates

    class Msg:
        def __init__(self, offset: int) -> None:
            self._offset = offset

        def topic(self) -> str:
            return REPARTITION

        def partition(self) -> int:
            return 0

        def offset(self) -> int:
            return self._offset

    from shardworker.tablecontext import CONTEXT

    counts = table("counts", CONTEXT, default=int)
    task = open_task(tmp_path / "s", [counts])
    states = TaskStates.__new__(TaskStates)
    try:
        CONTEXT.set_record(task, REPARTITION, 0, 5, 1)
        counts["c1"] += 1
        states.rollback_record(Msg(6))               # a later record failed to decode
        assert counts["c1"] == 1
        states.rollback_record(Msg(5))               # the record in hand failed
        assert counts["c1"] == 0
    finally:
        CONTEXT.clear()
        task.close()


def test_the_newest_batch_carries_every_mark_and_a_restore_never_lowers_one(tmp_path):
    """Compaction keeps only the newest record of a key, and restore goes table by
    table: the marks travel whole with each batch, and applying an older one never
    takes a stored mark back."""
    ctx = TableContext()
    counts, names = table("counts", ctx, default=int), table("names", ctx)
    task = open_task(tmp_path / "s", [counts, names])
    task.origins.admit("spend|orders|1", (50, 0))
    ctx.set_record(task, REPARTITION, 0, 0, 1)
    counts["c1"] += 1
    names["c1"] = "ann"
    first = task.drain({(REPARTITION, 0): 1})
    first.commit({"counts": 0, "names": 0})
    task.origins.admit("spend|orders|1", (90, 0))
    task.origins.admit("spend|orders|2", (3, 0))
    ctx.set_record(task, REPARTITION, 0, 1, 2)
    counts["c1"] += 1                              # only one table changes in the second
    second = task.drain({(REPARTITION, 0): 2})
    marks = decode_marks(dict(second.records[0].headers)[HDR_ORIGINS])
    assert marks == {"spend|orders|1": (90, 0), "spend|orders|2": (3, 0)}
    task.close()
    fresh = TaskStore(str(tmp_path / "fresh"), ["counts", "names"])
    committed = {(REPARTITION, 0): 2}
    apply_changelog(fresh, "counts", [(r.key, r.value, r.headers) for r in second.records],
                    committed, set_offsets=False)
    # a table restored after it holds only older records (here: the first batch's, its
    # first one with the older marks): they must not lower what is stored
    assert decode_marks(dict(first.records[0].headers)[HDR_ORIGINS]) == {"spend|orders|1": (50, 0)}
    apply_changelog(fresh, "names", [(r.key, r.value, r.headers) for r in first.records],
                    committed, last_offset=0)
    assert fresh.origin_marks() == {"spend|orders|1": (90, 0), "spend|orders|2": (3, 0)}
    fresh.close()


def test_a_record_read_again_numbers_its_sends_from_0_and_a_dead_letter_drops_its_origin():
    from shardworker.deadletters import dead_letter
    from shardworker.origins import HDR_ORIGIN
    from tests.unit.fakes import Message

    stamper = OriginStamper()
    stamper.header("split", "lines", 2, 40)
    stamper.forget()  # the chunk ended; the record is read again after a rewind
    assert parse_origin(stamper.header("split", "lines", 2, 40)[1]) == ("split|lines|2", (40, 0))

    sent = []

    class Producer:
        def produce(self, topic, value=None, key=None, partition=-1, headers=None,
                    on_delivery=None):
            sent.append((topic, headers))

    class Agent:
        name, dlq_topic, on_error = "count", "app-count-dlq", "dlq"

    upstream = stamper.header("split", "lines", 2, 41)
    failed = Message("words", 0, 5, b"x", headers=[upstream, ("trace-id", b"abc")])
    dead_letter(Producer(), Agent(), failed, ValueError("bad"), 1_000_000)
    (topic, headers), = sent
    names = [name for name, _value in headers]
    assert topic == "app-count-dlq" and HDR_ORIGIN not in names and "trace-id" in names
