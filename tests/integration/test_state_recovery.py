"""Local state through kills and lost group offsets (real broker, real processes,
real LMDB): DESIGN.md, "State (LMDB)", "A kill does not cost a replay"."""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from typing import Dict, Optional, Tuple

import pytest
from confluent_kafka import OFFSET_INVALID, Producer

from shardworker.app import App
from shardworker.state import TaskStates, task_dir
from shardworker.store import open_readonly
from shardworker.changelog import (HDR_SRC_CONFIRMED, HDR_SRC_OFFSET, HDR_SRC_PARTITION,
                                   HDR_SRC_TOPIC)
from tests.conftest import create_topic, read_to_end
from tests.integration.test_tables import produce_orders, table, truth, wait_for_total

N = 40_000


@pytest.mark.timeout(180)
def test_a_killed_child_resumes_from_its_local_state_without_a_replay(broker, prefix,
                                                                     start_supervisor, tmp_path):
    """The child dies by SIGKILL right after an LMDB commit that the supervisor never
    heard of (so the state is ahead of the group's offset): the restarted task keeps its
    state, reads on from the state's own offset, restores nothing, and counts stay exact."""
    marker = str(tmp_path / "kill-now")
    sup = start_supervisor("tests.apps.killable_counter", "-c", "1",
                           env={"SHARDSUP_TEST_KILL_MARKER": marker, "SHARDSUP_TEST_WORK_US": "50"})
    sup.wait_for(lambda: len(sup.child_tasks()) == 1, 30, "one child")
    produce_orders(broker, f"{prefix}-in", 0, N)
    sup.wait_for(lambda: sum(table(sup.datadir, "counts", prefix).values()) >= N // 4, 60,
                 "the child to be busy")
    open(marker, "w").close()
    sup.wait_for(lambda: "died with code -9" in sup.output(), 30, "the planted kill")
    counts, sums = truth(N)
    assert wait_for_total([sup.datadir], prefix, N, timeout=120) == dict(counts)
    assert table(sup.datadir, "sums", prefix) == dict(sums)
    assert sup.stop() == 0
    after = sup.output().split("died with code -9", 1)[1]
    assert "rebuilding" not in after, after[-3000:]
    assert "resumed from local state" in after, after[-3000:]
    # a task restores only what its LMDB never got: a task killed before its first LMDB
    # commit has no local state, and (no offset reported yet either) takes the batches
    # its changelog holds; none replays a changelog over a state it had
    restored = re.findall(r"task (\S+): restored (\d+) changelog records", after)
    assert restored, after[-3000:]
    fresh = set(re.findall(r"task (\S+): the group has no offset", after))
    assert all(n == "0" or task in fresh for task, n in restored), restored


def task_states(prefix: str, broker: str, datadir: str) -> TaskStates:
    """The child's TaskStates for the counter app's tables, in this process (no agent
    runs: only the open/restore decisions are exercised, against the real broker)."""
    app = App(prefix, broker=f"kafka://{broker}")
    orders = app.topic(f"{prefix}-in", partitions=4, key_serializer="str", value_serializer="json")
    for name in ("counts", "sums", "per_minute", "hopping"):
        app.table(name, default=int)

    @app.agent(orders)
    async def count(stream):  # noqa: ANN001 - declares the source topic only
        async for _value in stream:
            pass

    consumer_config = {**app.kafka_config(broker), "group.id": prefix,
                       "enable.auto.commit": False, "isolation.level": "read_committed"}
    return TaskStates(app, datadir, consumer_config, producer_for=lambda task: None,
                      heartbeat=lambda: None, delivery_errors=[])


def stored_counts(datadir: str, prefix: str, task: str) -> Tuple[Dict[bytes, bytes], Optional[int]]:
    store = open_readonly(task_dir(datadir, prefix, task))
    try:
        return dict(store.items("counts")), store.input_offset(f"{prefix}-in", int(task[2:]))
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_lost_group_offsets_restore_the_tables_instead_of_wiping_them(broker, prefix,
                                                                      start_supervisor):
    """The group's offsets are gone (a reset, retention): a task with local state keeps
    it and reads on from it; a task without restores the changelog up to the newest
    position its records say was durable everywhere, and reads on from there: its
    tables are then exactly those of the input below that offset."""
    sup = start_supervisor("tests.apps.counter", "-c", "1")
    sup.wait_for(lambda: len(sup.child_tasks()) == 1, 30, "one child")
    # two rounds: the second round's changelog records say the first is durable (a
    # batch's records name the position LMDB had when it was drained)
    produce_orders(broker, f"{prefix}-in", 0, 8_000)
    wait_for_total([sup.datadir], prefix, 8_000, timeout=60)
    produce_orders(broker, f"{prefix}-in", 8_000, 16_000)
    wait_for_total([sup.datadir], prefix, 16_000, timeout=60)
    assert sup.stop() == 0
    before, offset = stored_counts(sup.datadir, prefix, "0_1")
    assert before and offset and offset > 0
    no_offset = OFFSET_INVALID  # what the group hands out when nothing is committed
    states = task_states(prefix, broker, sup.datadir)
    try:
        tp = (f"{prefix}-in", 1)
        assert states.open("0_1", {tp: no_offset}) == {tp: offset}
    finally:
        states.close_all()
    assert stored_counts(sup.datadir, prefix, "0_1") == (before, offset)
    shutil.rmtree(task_dir(sup.datadir, prefix, "0_1"))  # and now without local state
    states = task_states(prefix, broker, sup.datadir)
    try:
        resumed = states.open("0_1", {(f"{prefix}-in", 1): no_offset})[(f"{prefix}-in", 1)]
    finally:
        states.close_all()
    # the last batches' records name an earlier durable position than the stop's
    assert 0 < resumed <= offset
    expected = Counter(m.key() for m in read_to_end(broker, f"{prefix}-in")
                       if m.partition() == 1 and m.offset() < resumed)
    counts, at = stored_counts(sup.datadir, prefix, "0_1")
    assert at == resumed
    assert {json.loads(k): int(v) for k, v in counts.items()} == \
        {k.decode(): n for k, n in expected.items()}


@pytest.mark.timeout(60)
def test_lost_offsets_never_resume_past_a_batch_that_reached_only_some_changelogs(
        broker, prefix, tmp_path):
    """A child killed before any offset was committed left batch B1 in one changelog
    (sums) but not the other (counts).  Restoring with no group offset must stop at the
    position before B1 (B1 is read again), not resume past it with B1 missing from
    counts (which lost one batch of counts for good)."""
    for name in ("counts", "sums", "per_minute", "hopping"):
        create_topic(broker, f"{prefix}-{name}-changelog", 4)
    create_topic(broker, f"{prefix}-in", 4)
    producer = Producer({"bootstrap.servers": broker})

    def record(table: str, value: int, last: int, confirmed: int) -> None:
        producer.produce(f"{prefix}-{table}-changelog", str(value).encode(), b'"u1"',
                         partition=1, headers=[(HDR_SRC_TOPIC, f"{prefix}-in".encode()),
                                               (HDR_SRC_PARTITION, b"1"),
                                               (HDR_SRC_OFFSET, str(last).encode()),
                                               (HDR_SRC_CONFIRMED, str(confirmed).encode())])

    record("counts", 4, 999, 0)      # B0 (offsets 0-999), both tables
    record("sums", 12, 999, 0)
    record("counts", 9, 1999, 1000)  # B1 (offsets 1000-1999): its LMDB commit confirmed B0
    record("sums", 30, 1999, 1000)
    record("sums", 41, 2999, 1000)   # B2 reached sums only: the child died here
    assert producer.flush(10) == 0
    datadir = str(tmp_path / "d")
    states = task_states(prefix, broker, datadir)
    try:
        assert states.open("0_1", {(f"{prefix}-in", 1): OFFSET_INVALID}) == {(f"{prefix}-in", 1): 1000}
        assert states.tasks["0_1"].store.get("counts", b'"u1"') == b"4"
        assert states.tasks["0_1"].store.get("sums", b'"u1"') == b"12"
    finally:
        states.close_all()


@pytest.mark.timeout(240)
def test_a_restore_stops_cleanly_when_told_and_goes_on_from_where_it_got_to(
        broker, prefix, start_supervisor, tmp_path):
    """A new machine restores every task from the changelog; the supervisor is stopped
    in the middle (TERM: it stops its child): the child leaves the restore and exits
    cleanly.  Started again, the restore goes on from the changelog position it had
    stored, not from the beginning, and the counts are exact."""
    first = start_supervisor("tests.apps.counter", "-c", "1", name="first")
    first.wait_for(lambda: len(first.child_tasks()) == 1, 30, "one child")
    produce_orders(broker, f"{prefix}-in", 0, N)
    wait_for_total([first.datadir], prefix, N, timeout=120)
    assert first.stop() == 0
    changelog_records = sum(len(read_to_end(broker, f"{prefix}-{name}-changelog"))
                            for name in ("counts", "sums", "per_minute", "hopping"))
    marker = str(tmp_path / "restoring")
    second = start_supervisor("tests.apps.slow_restore_counter", "-c", "1", name="second",
                              env={"SHARDSUP_TEST_RESTORE_MARKER": marker})
    second.wait_for(lambda: os.path.exists(marker), 60, "a restore past its first progress")
    assert second.stop() == 0
    interrupted = second.output()
    assert "restore interrupted" in interrupted, interrupted[-3000:]
    assert "died with code" not in interrupted and "Traceback" not in interrupted
    third = start_supervisor("tests.apps.counter", "-c", "1", name="second")
    produce_orders(broker, f"{prefix}-in", N, N + 1_000)
    counts, sums = truth(N + 1_000)
    assert wait_for_total([third.datadir], prefix, N + 1_000, timeout=120) == dict(counts)
    assert table(third.datadir, "sums", prefix) == dict(sums)
    assert third.stop() == 0
    # (the same datadir: its log file now holds the third run only) the 1,000+ records
    # applied before the stop, whose progress was stored, are not read again
    restored = sum(int(n) for n in re.findall(r"restored (\d+) changelog records",
                                              third.output()))
    assert 0 < restored <= changelog_records - 1_000, (restored, changelog_records)
