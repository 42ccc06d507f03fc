"""A stream–table join on a co-partitioned table across faults (issue 13, point 7): orders
re-keyed by customer look up the customer's name in table ``names`` (fed by the
customers topic, same sub-topology: DESIGN.md, "Sub-topologies").  A child is killed -9,
a second supervisor joins, and one supervisor is killed -9 with its children while one
of them stalls mid-batch (fault injection, an event: the re-keying in the first test,
the join in the second), so the survivor holds every task, restores ``names`` and the
counts from the changelogs (DESIGN.md, "State (LMDB)") and joins the orders produced
after the failover with them.  Checks: every output carries the customer's name (at
least once: by order id) and the survivor's counts are exact."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import zlib
from typing import Dict, List, Set

import psutil
import pytest

from tests.conftest import ROOT, committed_offsets, read_topic
from tests.integration.test_stream_graph import (APP, CUSTOMERS, expected_spend, orders,
                                                 produce_default)

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


def table(app: str, datadir: str, name: str, prefix: str) -> Dict:
    """Table ``name`` as ``shardsup table`` shows it from ``datadir`` ({} while no task
    state is there yet)."""
    result = subprocess.run([sys.executable, "-m", "supervisor", "table", "-A", app,
                             "--datadir", datadir, name], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SHARDSUP_TEST_PREFIX": prefix})
    return json.loads(result.stdout) if result.returncode == 0 else {}


def wait_for_table(sup, app: str, name: str, prefix: str,  # type: ignore[no-untyped-def]
                   expected: Dict, timeout: float) -> None:
    """Waits until table ``name`` in ``sup``'s datadir is exactly ``expected``."""
    seen: Dict = {}

    def exact() -> bool:
        nonlocal seen
        seen = table(app, sup.datadir, name, prefix)
        return seen == expected

    try:
        sup.wait_for(exact, timeout, f"table {name} to be exact")
    except AssertionError:
        wrong = {k: (seen.get(k), v) for k, v in expected.items() if seen.get(k) != v}
        raise AssertionError(f"table {name}: (got, expected) where they differ: {wrong}; "
                             f"extra keys {set(seen) - set(expected)}\n{sup.output()[-4000:]}")


def kill_9(sup) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL to the supervisor; returns once its children died with it
    (PR_SET_PDEATHSIG: DESIGN.md, "Signals")."""
    children = [psutil.Process(pid) for pid in sup.child_tasks()]
    sup.proc.kill()
    sup.proc.wait(10)
    for child in children:
        child.wait(10)


def tasks_of(sup) -> List[str]:  # type: ignore[no-untyped-def]
    return sorted(t for ts in sup.child_tasks().values() for t in ts)


def every_task(subtopologies: int = 4) -> List[str]:
    return sorted(f"{s}_{p}" for s in range(subtopologies) for p in range(PARTITIONS))


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
    """A holds every task; a child stalls re-keying order 150 and is killed -9.  B joins
    and the tasks are shared (librdkafka's cooperative-sticky assignor gives it the join
    tasks 1_*, handed over warm: B restores ``names`` and the counts from the changelogs
    A wrote).  Re-keying one of a few chosen orders of the second wave stalls a child of
    A, and A is killed -9 then, children and all: forwards of a batch whose offsets were
    committed nowhere, which B forwards again and its join tasks skip (origins).  B takes
    every task and joins a third wave."""
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
    wait_for_table(a, APP, "names", prefix, names, 60)

    # wave 1: a child of A stalls mid-batch and is killed -9; A's next child goes on
    produce_default(broker, f"{prefix}-orders", orders(*WAVES[0]))
    marker = stall_dir / f"stall-{CHILD_STALL}"
    a.wait_for(marker.exists, 60, f"a child of A to stall on order {CHILD_STALL}")
    os.kill(int(marker.read_text()), signal.SIGKILL)
    sums, counts = expected_spend(WAVES[0][1])
    wait_for_table(a, APP, "orders_seen", prefix, counts, 60)
    assert a.output().count("died with code -9") == 1, a.output()[-3000:]

    # B joins: the group shares the tasks between the two
    b = start_supervisor(APP, "-c", "2", name="b", env=env)
    b.wait_for(lambda: bool(tasks_of(b)) and sorted(tasks_of(a) + tasks_of(b)) == every_task(),
               60, "the group to share the tasks between A and B")

    # wave 2: A is killed -9 (with its children) when one of its children stalls on a
    # chosen order; if the group left A no re-keying task, when the wave is joined
    produce_default(broker, f"{prefix}-orders", orders(*WAVES[1]))

    def stalled() -> List[int]:
        return [n for n in wave_two_stalls if (stall_dir / f"stall-{n}").exists()]

    a_rekeys = [t for t in tasks_of(a) if t.startswith("0_")]
    if a_rekeys:
        a.wait_for(lambda: bool(stalled()), 60, "a child of A to stall in the second wave")
    else:
        outputs_by_order(broker, prefix, set(range(*WAVES[1])), 60)
    kill_9(a)

    b.wait_for(lambda: tasks_of(b) == every_task(), 60, "B to hold every task")
    # wave 3: joined by B alone, with the names it restored
    produce_default(broker, f"{prefix}-orders", orders(*WAVES[2]))
    total = WAVES[-1][1]
    sums, counts = expected_spend(total)
    wait_for_table(b, APP, "orders_seen", prefix, counts, 60)
    wait_for_table(b, APP, "by_customer", prefix, sums, 30)
    assert table(APP, b.datadir, "names", prefix) == names

    outputs = outputs_by_order(broker, prefix, set(range(total)), 60)
    assert {o["order"] for o in outputs} == set(range(total))
    unjoined = [o for o in outputs if o["name"] != names[o["customer"]]]
    assert not unjoined, unjoined[:5]
    for p in range(PARTITIONS):  # a join task B took from A restored A's changelog records
        assert re.search(rf"task 1_{p}: restored [1-9][0-9]* changelog records", b.output()), \
            b.output()[-3000:]
    print(f"A re-keyed {a_rekeys} after B joined; stalled on {stalled()} when killed")
    assert b.stop() == 0


JOIN_APP = "tests.apps.join_stall"
#: joining this order stalls the child hosting its join task (tests/apps/join_stall.py)
JOIN_STALL = 450


@pytest.mark.timeout(150)
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_the_join_holds_when_the_supervisor_holding_the_join_task_is_killed_9_mid_join(
        broker, prefix, start_supervisor, tmp_path, guarantee):
    """Two supervisors share the tasks; joining order 450 stalls the child that hosts its
    join task, wherever the group put it (B, with librdkafka's assignor), and that
    child's supervisor is killed -9 once its other join tasks committed part of the
    wave: the stalled batch (counts, outputs) reached no commit.  The survivor (A, taking
    its join tasks back over a stale copy) takes every task, restores from the
    changelogs what the victim committed, joins order 450 and the rest of the wave again
    and a third wave after it."""
    names = {f"c{i}": f"name-{i}" for i in range(CUSTOMERS)}
    env = {"SHARDSUP_TEST_GUARANTEE": guarantee, "SHARDSUP_TEST_STALL_DIR": str(tmp_path),
           "SHARDSUP_TEST_JOIN_STALL_AT": str(JOIN_STALL)}
    a = start_supervisor(JOIN_APP, "-c", "2", name="a", env=env)
    a.wait_for(lambda: tasks_of(a) == every_task(2), 60, "A to hold every task")
    produce_default(broker, f"{prefix}-customers",
                    [(k.encode(), json.dumps({"name": v}).encode()) for k, v in names.items()],
                    {"partitioner": "murmur2_random"})
    wait_for_table(a, JOIN_APP, "names", prefix, names, 60)
    produce_default(broker, f"{prefix}-orders", orders(*WAVES[0]))
    sums, counts = expected_spend(WAVES[0][1])
    wait_for_table(a, JOIN_APP, "orders_seen", prefix, counts, 60)

    b = start_supervisor(JOIN_APP, "-c", "2", name="b", env=env)
    b.wait_for(lambda: bool(tasks_of(b)) and sorted(tasks_of(a) + tasks_of(b)) == every_task(2),
               60, "the group to share the tasks between A and B")
    repartition = f"{prefix}-by-customer-repartition"
    shared_at = committed_offsets(broker, prefix, repartition, PARTITIONS)

    produce_default(broker, f"{prefix}-orders", orders(*WAVES[1]))
    marker = tmp_path / f"join-stall-{JOIN_STALL}"
    b.wait_for(marker.exists, 60, f"the join of order {JOIN_STALL} to stall")
    stalled = int(marker.read_text())
    victim, survivor = (a, b) if stalled in a.child_tasks() else (b, a)
    held = victim.child_tasks()
    assert any(t.startswith("1_") for t in held[stalled]), held
    # the victim's other join tasks commit part of the wave first, so the survivor
    # restores their changelog records (not only the state it held before the share)
    committing = sorted(int(t[2:]) for pid, ts in held.items() if pid != stalled
                        for t in ts if t.startswith("1_"))
    victim.wait_for(lambda: all(
        committed_offsets(broker, prefix, repartition, PARTITIONS)[p] > shared_at[p]
        for p in committing), 60, f"the victim to commit join tasks {committing}")
    kill_9(victim)
    before_kill = len(survivor.output())

    survivor.wait_for(lambda: tasks_of(survivor) == every_task(2), 60,
                      "the survivor to hold every task")
    produce_default(broker, f"{prefix}-orders", orders(*WAVES[2]))
    total = WAVES[-1][1]
    sums, counts = expected_spend(total)
    wait_for_table(survivor, JOIN_APP, "orders_seen", prefix, counts, 60)
    wait_for_table(survivor, JOIN_APP, "by_customer", prefix, sums, 30)
    assert table(JOIN_APP, survivor.datadir, "names", prefix) == names

    outputs = outputs_by_order(broker, prefix, set(range(total)), 60)
    unjoined = [o for o in outputs if o["name"] != names[o["customer"]]]
    assert not unjoined, unjoined[:5]
    for p in committing:
        found = re.search(rf"task 1_{p}: restored ([1-9][0-9]*) changelog records",
                          survivor.output()[before_kill:])
        assert found, survivor.output()[before_kill:][-3000:]
    print(f"killed {'A' if victim is a else 'B'} ({held}) stalled on order {JOIN_STALL}; "
          f"join tasks committing first: {committing}")
    assert survivor.stop() == 0
