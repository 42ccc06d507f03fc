"""A stream–table join on a co-partitioned table across faults (issue 13, point 7): orders
re-keyed by customer look up the customer's name in table ``names`` (fed by the
customers topic, same sub-topology: DESIGN.md, "Sub-topologies") while a child is
killed -9, a second supervisor joins, and the first is killed -9 with its children, so
the second restores ``names`` and the counts from the changelogs (DESIGN.md, "State
(LMDB)") and joins the orders produced after the failover with them."""
from __future__ import annotations

import json
import os
import signal
import zlib
from typing import Dict, List, Set

import psutil
import pytest

from tests.conftest import read_topic
from tests.integration.test_stream_graph import (APP, CUSTOMERS, expected_spend, orders,
                                                 produce_default, table, wait_for_table)

PARTITIONS = 4
WAVES = [(0, 300), (300, 600), (600, 900)]
#: re-keying this order stalls a child of the first supervisor, which the test kills -9
CHILD_STALL = 150


def partition_of(order: int) -> int:
    """The partition librdkafka's default partitioner (consistent_random: CRC32 of the
    key) gives order ``order``'s key."""
    return zlib.crc32(f"o{order}".encode()) % PARTITIONS


def one_per_partition(start: int) -> List[int]:
    """The first order id at or after ``start`` landing in each partition: the first
    supervisor stalls on whichever of them its children re-key, wherever the group put
    the re-keying tasks after the second supervisor joined."""
    found: Dict[int, int] = {}
    n = start
    while len(found) < PARTITIONS:
        found.setdefault(partition_of(n), n)
        n += 1
    return sorted(found.values())


def tasks_of(sup) -> List[str]:  # type: ignore[no-untyped-def]
    return sorted(t for ts in sup.child_tasks().values() for t in ts)


def every_task() -> List[str]:
    return sorted(f"{s}_{p}" for s in range(4) for p in range(PARTITIONS))


def outputs_by_order(broker: str, prefix: str, wanted: Set[int], timeout: float) -> List[dict]:
    """Every output read until each order of ``wanted`` has one (at least once: an order
    may show more than once)."""
    def complete(messages: List) -> bool:
        return wanted <= {json.loads(m.value())["order"] for m in messages}

    return [json.loads(m.value())
            for m in read_topic(broker, f"{prefix}-out", 0, timeout, until=complete)]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_the_join_holds_across_a_child_kill_9_and_a_failover_by_kill_9(
        broker, prefix, start_supervisor, tmp_path, guarantee):
    """A: every task; a child stalls re-keying order 150 and is killed -9.  B joins and
    the tasks are shared; re-keying one of a few chosen orders of the second wave stalls
    a child of A, and A is killed -9 then (children and all: their forwards and counts
    committed nowhere).  B takes every task, restoring ``names`` and the counts from the
    changelogs, and joins a third wave.  Every output carries its customer's name, and
    B's counts are exact."""
    wave_two_stalls = one_per_partition(450)
    stall_dir = tmp_path / "stalls"
    stall_dir.mkdir()
    env = {"SHARDSUP_TEST_GUARANTEE": guarantee}
    a = start_supervisor(APP, "-c", "2", name="a", env={
        **env, "SHARDSUP_TEST_STALL_DIR": str(stall_dir),
        "SHARDSUP_TEST_STALL_AT": ",".join(map(str, [CHILD_STALL, *wave_two_stalls]))})
    a.wait_for(lambda: tasks_of(a) == every_task(), 60, "A to hold every task")
    names = {f"c{i}": f"name-{i}" for i in range(CUSTOMERS)}
    produce_default(broker, f"{prefix}-customers",
                    [(k.encode(), json.dumps({"name": v}).encode()) for k, v in names.items()],
                    {"partitioner": "murmur2_random"})
    wait_for_table(a, a.datadir, "names", prefix, names, 60)

    # wave 1: a child of A stalls mid-batch and is killed -9; A's next child goes on
    produce_default(broker, f"{prefix}-orders", orders(*WAVES[0]))
    marker = stall_dir / f"stall-{CHILD_STALL}"
    a.wait_for(marker.exists, 60, f"a child of A to stall on order {CHILD_STALL}")
    os.kill(int(marker.read_text()), signal.SIGKILL)
    sums, counts = expected_spend(WAVES[0][1])
    wait_for_table(a, a.datadir, "orders_seen", prefix, counts, 60)
    assert a.output().count("died with code -9") == 1, a.output()[-3000:]

    # B joins: the group shares the tasks between the two
    b = start_supervisor(APP, "-c", "2", name="b", env=env)
    b.wait_for(lambda: bool(tasks_of(b)) and sorted(tasks_of(a) + tasks_of(b)) == every_task(),
               60, "the group to share the tasks between A and B")

    # wave 2: A is killed -9 (with its children) when one of its children stalls on a
    # chosen order; if the group left A no re-keying task, when the wave is joined
    produce_default(broker, f"{prefix}-orders", orders(*WAVES[1]))
    stalled = lambda: [n for n in wave_two_stalls if (stall_dir / f"stall-{n}").exists()]  # noqa: E731
    a_rekeys = [t for t in tasks_of(a) if t.startswith("0_")]
    if a_rekeys:
        a.wait_for(lambda: bool(stalled()), 60, "a child of A to stall in the second wave")
    else:
        outputs_by_order(broker, prefix, set(range(*WAVES[1])), 60)
    a_children = [psutil.Process(pid) for pid in a.child_tasks()]
    a.proc.kill()
    a.proc.wait(10)
    for child in a_children:  # PR_SET_PDEATHSIG: they die with A
        child.wait(10)

    b.wait_for(lambda: tasks_of(b) == every_task(), 60, "B to hold every task")
    # wave 3: joined by B alone, with the names it restored
    produce_default(broker, f"{prefix}-orders", orders(*WAVES[2]))
    total = WAVES[-1][1]
    sums, counts = expected_spend(total)
    wait_for_table(b, b.datadir, "orders_seen", prefix, counts, 60)
    wait_for_table(b, b.datadir, "by_customer", prefix, sums, 30)
    assert table(b.datadir, "names", prefix) == names

    outputs = outputs_by_order(broker, prefix, set(range(total)), 60)
    assert {o["order"] for o in outputs} == set(range(total))
    unjoined = [o for o in outputs if o["name"] != names[o["customer"]]]
    assert not unjoined, unjoined[:5]
    for task in (f"1_{p}" for p in range(PARTITIONS)):
        assert f"task {task}: restored" in b.output(), b.output()[-3000:]
    print(f"A re-keyed {a_rekeys} after B joined; stalled on {stalled()} when killed")
    assert b.stop() == 0
