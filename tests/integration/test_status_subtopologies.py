"""``shardsup status`` and the USR1 dump of an app with sub-topologies (tests/apps/graph.py:
orders re-keyed through a repartition topic, four sub-topologies): tasks grouped by
sub-topology, the repartition topic's lag shown — a real broker, real processes."""
from __future__ import annotations

import os
import re
import signal

import pytest

from tests.integration.test_operations import status, wait_for_status
from tests.integration.test_stream_graph import APP, orders, produce_default

SUBTOPOLOGY_TASKS = {i: [f"{i}_{p}" for p in range(4)] for i in range(4)}


def settled(reading: dict, rekeyed: str) -> bool:
    """Every task runs and the lag of every one of its topics is known."""
    tasks = reading.get("tasks") or {}
    subs = reading.get("subtopologies") or []
    return (len(tasks) == 16 and all(t["state"] == "running" for t in tasks.values())
            and len(subs) == 4 and all(t["unknown"] == 0 and isinstance(t["lag"], int)
                                       for s in subs for t in s["topics"])
            and subs[1]["topics"][0]["name"] == rekeyed)


@pytest.mark.timeout(90)
def test_status_and_dump_group_tasks_by_sub_topology(broker, prefix, start_supervisor):
    rekeyed = f"{prefix}-by-customer-repartition"
    sup = start_supervisor(APP, "-c", "2")
    sup.wait_for(lambda: "sub-topologies" in sup.output(), 60, "the supervisor to start")
    produce_default(broker, f"{prefix}-orders", orders(0, 200))  # the repartition topic fills
    reading = wait_for_status(sup, lambda r: settled(r, rekeyed), 60,
                              "every task running with its topics' lag known")

    subs = reading["subtopologies"]
    assert [s["tasks"] for s in subs] == [SUBTOPOLOGY_TASKS[i] for i in range(4)]
    assert subs[1]["tables"] == ["by_customer", "orders_seen", "names"]
    assert [(t["name"], t["kind"]) for t in subs[1]["topics"]] == [
        (rekeyed, "repartition"), (f"{prefix}-customers", "source")]
    assert subs[1]["topics"][0]["lag"] >= 0
    assert reading["tasks"]["1_2"]["subtopology"] == 1
    assert set(reading["tasks"]["1_2"]["topic_lag"]) == {rekeyed, f"{prefix}-customers"}

    text = status(sup.datadir)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    head = lines.index(f"sub-topology 1: {rekeyed} (repartition), {prefix}-customers; "
                       "tables by_customer, orders_seen, names")
    assert [line.split()[0] for line in lines[head + 1:head + 5]] == SUBTOPOLOGY_TASKS[1]
    assert all(re.search(r"child [01] +running +lag \d+ +\(" + re.escape(rekeyed) + r" \d+, ", line)
               for line in lines[head + 1:head + 5]), lines[head:head + 5]
    assert lines[head + 5] == f"sub-topology 2: {prefix}-lines"
    assert re.search(rf"^repartition topic {re.escape(rekeyed)}: lag \d+ over 4 tasks here$",
                     text.stdout, re.M), text.stdout

    latest = os.path.join(sup.datadir, "dump-latest.txt")
    os.kill(sup.proc.pid, signal.SIGUSR1)
    sup.wait_for(lambda: os.path.exists(latest), 30, "the dump")  # written whole (os.replace)
    with open(latest) as f:
        report = f.read()
    assert f"  sub-topology 1: {rekeyed} (repartition), {prefix}-customers; " in report
    assert re.search(rf"^  1_3 \(sub-topology 1\): {re.escape(rekeyed)}\[3\]=(\d+|-), "
                     rf"{prefix}-customers\[3\]=(\d+|-)$", report, re.M), report[-3000:]
    assert sup.stop() == 0
