"""Exactly-once restarts (issue 11, point 2): a child killed with kill -9 right after a
transaction committed, before it reported the offsets, is restarted from the group's
committed offsets, never from the older ones the supervisor last heard.

The kill is an event (the first commit carrying offsets once a file exists), and the
dying child writes down what its transactions committed: a read from the broker after
the kill could already see the restarted child's own first commit."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Dict

import pytest

from shardworker.partitioner import partition_for
from tests.conftest import committed_offsets, produce, read_to_end, read_topic
from tests.integration.test_supervision import wait_until

#: tansu keeps the records of aborted transactions visible to read_committed consumers
#: (DESIGN.md, "Tests and the broker"): exact output counts are checked on a real Kafka only
KAFKA_HONOURS_ABORTS = bool(os.environ.get("SHARDSUP_TEST_BROKER"))

N = 20_000
PARTS = 4
DIED = re.compile(r"child \d+ \(tasks ([\d_,]+)\) died with code -9")
ASSIGNED = re.compile(r"\] assigned (.*)$", re.MULTILINE)


def records(start: int, stop: int):
    """Keyed ``k<n>`` on the partition Java's partitioner gives the key, as a co-partitioned
    pipeline's input is: each output (keyed like its input) goes to its own task's sink
    partition, so no two tasks' transactions share a partition.  Tansu holds a committed
    transaction's offsets back while another open transaction shares one of its partitions
    (DESIGN.md, "Tests and the broker"), which a restarted child could read before."""
    return [(f"k{n}".encode(), json.dumps({"n": n}).encode(),
             partition_for(f"k{n}".encode(), PARTS)) for n in range(start, stop)]


def start_offsets_after(output: str, position: int) -> Dict[int, int]:
    """The start offset of each partition in the children's "assigned" lines logged
    after ``position`` of the supervisor's output (the offsets actually used)."""
    starts: Dict[int, int] = {}
    for match in ASSIGNED.finditer(output, position):
        for part, offset in re.findall(r"\[(\d+)\]@(-?\d+)", match.group(1)):
            starts[int(part)] = int(offset)
    return starts


@pytest.mark.timeout(180)
def test_a_child_killed_after_a_commit_restarts_from_the_committed_offsets(
        broker, prefix, start_supervisor, tmp_path):
    kill_file = tmp_path / "kill-after-next-commit"
    sup = start_supervisor("tests.apps.eos_doubler", "-c", "2",
                           env={"SHARDSUP_TEST_WORK_US": "150",
                                "SHARDSUP_TEST_KILL_AFTER_COMMIT": str(kill_file)})
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    produce(broker, f"{prefix}-in", records(0, N // 2))
    # transactions have committed offsets, so the supervisor heard of some too; then the
    # fault is armed and the second half's first commit carrying offsets fires it
    wait_until(lambda: any(o > 0 for o in committed_offsets(broker, prefix, f"{prefix}-in",
                                                            PARTS).values()),
               60, "a first committed transaction")
    kill_file.touch()
    produce(broker, f"{prefix}-in", records(N // 2, N))
    sup.wait_for(lambda: DIED.search(sup.output()) is not None, 60,
                 "a child to die right after a commit")
    assert not kill_file.exists()
    # what the dead child's transactions committed, as it wrote it down before the kill
    # (a read from the broker now could already see the restarted child's first commit)
    committed_path = kill_file.with_suffix(".committed")
    died = DIED.search(sup.output())
    assert died is not None
    victim_parts = [int(task.split("_")[1]) for task in died.group(1).split(",")]
    committed = {part: offset for _t, part, offset in json.loads(committed_path.read_text())}
    assert set(committed) <= set(victim_parts) and any(o > 0 for o in committed.values())
    # the broker agrees (a separate read_committed consumer; tansu may show a commit a
    # moment after commit_transaction returned)
    wait_until(lambda: all(committed_offsets(broker, prefix, f"{prefix}-in", PARTS)[part] >= offset
                           for part, offset in committed.items()),
               30, "the broker to show what the child committed")
    sup.wait_for(lambda: set(victim_parts) <= set(start_offsets_after(sup.output(), died.end())),
                 60, "the killed child's tasks to be assigned again")
    starts = start_offsets_after(sup.output(), died.end())
    for part, offset in committed.items():
        assert starts[part] >= offset, (
            f"partition {part} restarted at {starts[part]}, below the committed {offset}")
    # nothing lost; on a real Kafka, nothing committed twice either
    outputs = read_topic(broker, f"{prefix}-out", N, timeout=120)
    seen = Counter(json.loads(msg.value())["n"] for msg in outputs)
    assert set(seen) == set(range(N)), "an output was lost"
    assert sup.stop() == 0
    if KAFKA_HONOURS_ABORTS:
        final = Counter(json.loads(m.value())["n"] for m in read_to_end(broker, f"{prefix}-out"))
        assert len(final) == N and max(final.values()) == 1, "an output was committed twice"
