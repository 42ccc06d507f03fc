"""Status, metrics and dumps grouped by sub-topology (supervisor/subtopologies.py): each
task's lag per source topic from the child's heartbeat, a repartition topic's lag over
this supervisor's tasks, the text of ``shardsup status``.  Pure logic: no broker, no
child process."""
from __future__ import annotations

import json
import signal
from typing import Any, Dict, List, Tuple

import pytest
from confluent_kafka import TopicPartition

from shardworker.protocol import Stats, decode
from shardworker.topology import SubTopology, Topology
from supervisor.children import ChildSlot
from supervisor.dump import dump_report
from supervisor.snapshot import snapshot
from supervisor.status import format_status
from supervisor.subtopologies import format_groups, topic_kinds
from supervisor.web import render_metrics

pytestmark = pytest.mark.timeout(10)

REKEYED = "p-by-customer-repartition"
TOPOLOGY = Topology([SubTopology(0, ("orders",)),
                     SubTopology(1, (REKEYED, "customers"), ("by_customer", "names"))])
KINDS = {REKEYED: "repartition"}


def slot(index: int, tasks: List[str], stats: Stats, state: str = "running") -> ChildSlot:
    """A slot as its heartbeats left it (no process, no channel)."""
    s = ChildSlot(index, tasks)
    s.state = state
    s.record_stats(stats)
    return s


def two_children() -> List[ChildSlot]:
    """Child 0 runs 0_0 and 1_0; child 1 runs 1_1, whose repartition lag is unknown yet;
    1_2 is on a failed child."""
    first = slot(0, ["0_0", "1_0"], Stats(tasks=["0_0", "1_0"], lag={"0_0": 3, "1_0": 12}, topic_lag={
        "0_0": {"orders": 3}, "1_0": {REKEYED: 10, "customers": 2}}))
    second = slot(1, ["1_1"], Stats(tasks=["1_1"], lag={"1_1": None},
                                    topic_lag={"1_1": {REKEYED: None, "customers": 0}}))
    failed = ChildSlot(2, ["1_2"])
    failed.fail(now=100.0, retry_after=300.0)
    return [first, second, failed]


def doc() -> Dict[str, Any]:
    return snapshot(two_children(), app_id="p", broker="b:1", datadir="d", started_at=90.0,
                    state="running", group=None, now=150.0, topology=TOPOLOGY, kinds=KINDS)


def test_the_snapshot_carries_each_tasks_sub_topology_and_lag_per_topic() -> None:
    tasks = doc()["tasks"]
    assert tasks["0_0"] == {"child": 0, "state": "running", "lag": 3, "subtopology": 0,
                            "topic_lag": {"orders": 3}}
    assert tasks["1_0"]["subtopology"] == 1
    assert tasks["1_0"]["topic_lag"] == {REKEYED: 10, "customers": 2}
    assert tasks["1_1"]["topic_lag"] == {REKEYED: None, "customers": 0}
    assert tasks["1_2"]["topic_lag"] == {REKEYED: None, "customers": None}  # its child is down


def test_the_snapshot_lists_sub_topologies_with_their_topics_lag_over_the_tasks_here() -> None:
    assert doc()["subtopologies"] == [
        {"index": 0, "tables": [], "tasks": ["0_0"],
         "topics": [{"name": "orders", "kind": "source", "lag": 3, "unknown": 0}]},
        {"index": 1, "tables": ["by_customer", "names"], "tasks": ["1_0", "1_1", "1_2"],
         "topics": [{"name": REKEYED, "kind": "repartition", "lag": 10, "unknown": 2},
                    {"name": "customers", "kind": "source", "lag": 2, "unknown": 1}]}]
    # the JSON of ``shardsup status --json`` and /status
    assert json.loads(json.dumps(doc()))["subtopologies"][1]["topics"][0]["lag"] == 10


def test_a_snapshot_without_the_topology_has_no_sub_topologies() -> None:
    plain = snapshot(two_children(), app_id="p", broker="b:1", datadir="d", started_at=90.0,
                     state="running", group=None, now=150.0)
    assert "subtopologies" not in plain and "topic_lag" not in plain["tasks"]["1_0"]
    assert format_groups(plain) == []


def test_status_text_groups_tasks_under_their_sub_topology() -> None:
    text = format_status(doc())
    groups = text.split("\n\n")[-1].splitlines()
    assert groups == [
        "sub-topology 0: orders",
        "  0_0  child 0  running  lag 3",
        f"sub-topology 1: {REKEYED} (repartition), customers; tables by_customer, names",
        f"  1_0  child 0  running  lag 12  ({REKEYED} 10, customers 2)",
        f"  1_1  child 1  running  lag -   ({REKEYED} -, customers 0)",
        f"  1_2  child 2  failed   lag -   ({REKEYED} -, customers -)",
        f"repartition topic {REKEYED}: lag 10+? over 3 tasks here"]
    # the rest of the status is as before
    assert "CHILD" in text and "FAILED      1_2" in text


def test_a_sub_topology_without_tasks_here_says_so() -> None:
    empty = snapshot([], app_id="p", broker="b:1", datadir="d", started_at=90.0, state="running",
                     group=None, now=150.0, topology=TOPOLOGY, kinds=KINDS)
    assert format_groups(empty) == [
        "sub-topology 0: orders", "  no tasks here",
        f"sub-topology 1: {REKEYED} (repartition), customers; tables by_customer, names",
        "  no tasks here", f"repartition topic {REKEYED}: lag - over 0 tasks here"]


def test_metrics_carry_each_tasks_lag_per_topic() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(render_metrics(doc()))}
    samples = {(s.labels["task"], s.labels["topic"], s.labels["subtopology"], s.labels["child"]): s.value
               for s in families["shardsup_task_topic_lag"].samples}
    assert samples == {("0_0", "orders", "0", "0"): 3, ("1_0", REKEYED, "1", "0"): 10,
                       ("1_0", "customers", "1", "0"): 2, ("1_1", "customers", "1", "1"): 0}


def test_the_dump_names_each_tasks_sub_topology_and_its_topics(tmp_path) -> None:
    slots = [ChildSlot(0, ["0_0", "1_0"])]
    report = dump_report("p", str(tmp_path), slots,
                         {("orders", 0): 4, (REKEYED, 0): 7, ("customers", 0): -2}, TOPOLOGY, KINDS)
    assert ("sub-topologies:\n  sub-topology 0: orders\n"
            f"  sub-topology 1: {REKEYED} (repartition), customers; tables by_customer, names\n") in report
    child = report.split("== child ")[1].splitlines()
    assert child[1:5] == ["tasks: 0_0,1_0", "offsets:", "  0_0 (sub-topology 0): orders[0]=4",
                          f"  1_0 (sub-topology 1): {REKEYED}[0]=7, customers[0]=-"]  # - : none yet


def test_topic_kinds_name_repartition_and_through_topics() -> None:
    from tests.unit.graphapps import shop

    shop.app.topology  # reading the graph sets each agent's re-keying
    assert topic_kinds(shop.app) == {"shop-by-customer-repartition": "repartition", "words": "through"}


def test_stats_carry_lag_per_topic_and_ignore_fields_they_do_not_know() -> None:
    sent = Stats(1, 0, ["1_0"], {"1_0": 12}, False, {"1_0": {REKEYED: 10, "customers": 2}})
    wire = json.loads(json.dumps({"op": sent.op, **sent.fields()}))
    assert decode(wire) == sent
    assert decode({**wire, "from_a_newer_child": 1}) == sent
    older = {k: v for k, v in wire.items() if k != "topic_lag"}  # a child of the last version
    assert decode(older).topic_lag == {}


class Watermarks:
    """The consumer's cached fetch watermarks, per topic-partition (-1: no fetch yet)."""

    def __init__(self, marks: Dict[Tuple[str, int], Tuple[int, int]]) -> None:
        self.marks = marks

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> Tuple[int, int]:
        return self.marks.get((tp.topic, tp.partition), (-1, -1))


def test_a_childs_heartbeat_carries_each_tasks_lag_per_topic() -> None:
    from shardworker import App
    from shardworker.worker import Worker

    app = App("u", broker="kafka://127.0.0.1:9")
    seen = app.table("seen", default=int)

    @app.agent(app.topic("a", "b"))
    async def both(stream):  # type: ignore[no-untyped-def]
        async for key, _v in stream.items():
            seen[key] += 1

    class Sent:
        def __init__(self) -> None:
            self.sent: List[Any] = []

        def send(self, message: Any) -> None:
            self.sent.append(message)

    previous = signal.getsignal(signal.SIGTERM)
    worker = Worker(app, channel=Sent(), bootstrap="127.0.0.1:9", index=0)  # type: ignore[arg-type]
    worker.setup()
    real = worker.consumer
    try:
        # a: read to 5 of 10; b: nothing read yet (from its low watermark 2 to 7); task
        # 0_1: b not fetched yet
        worker.positions = {("a", 0): 5, ("b", 0): -1, ("a", 1): 0, ("b", 1): 0}
        worker.consumer = Watermarks({("a", 0): (0, 10), ("b", 0): (2, 7), ("a", 1): (0, 0)})  # type: ignore[assignment]
        worker._last_stats = 0.0
        worker.report(force=False)
        stats = [m for m in worker.channel.sent if isinstance(m, Stats)][-1]  # type: ignore[attr-defined]
        assert stats.topic_lag == {"0_0": {"a": 5, "b": 5}, "0_1": {"a": 0, "b": None}}
        assert stats.lag == {"0_0": 10, "0_1": None}
    finally:
        worker.consumer = real
        worker.ticker.stop()  # type: ignore[union-attr]
        for runner in worker.runners:
            runner.stop()
        real.close()
        signal.signal(signal.SIGTERM, previous)
