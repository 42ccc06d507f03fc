"""Local state through kills and lost group offsets (real broker, real processes,
real LMDB): DESIGN.md, "State (LMDB)", "A kill does not cost a replay"."""
from __future__ import annotations

import os
import re

import pytest

from tests.test_tables import produce_orders, table, truth, wait_for_total

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
    restored = [int(n) for n in re.findall(r"restored (\d+) changelog records", after)]
    assert restored and max(restored) == 0, restored
