"""/metrics of a real supervisor with two children (issue 15, point 1): scraped and parsed
with ``prometheus_client.parser``; a user counter incremented in both children is summed
exactly, per-task metrics carry their labels, and a child killed with KILL does not
take its counts back."""
from __future__ import annotations

import json
import os
import signal
from typing import Any, Dict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.broker import free_port
from tests.conftest import produce
from tests.integration.test_operations import get
from tests.integration.test_supervision import records

N = 400


def scrape(base: str) -> Dict[str, Any]:
    code, text = get(base + "/metrics")
    assert code == 200
    return {f.name: f for f in text_string_to_metric_families(text)}


def total(families: Dict[str, Any], name: str, sample: str) -> float:
    family = families.get(name)
    return sum(s.value for s in family.samples if s.name == sample) if family else 0


@pytest.mark.timeout(90)
def test_metrics_scrape_sums_a_user_counter_over_two_children(broker, prefix, start_supervisor):
    port = free_port()
    sup = start_supervisor("tests.apps.metered", "-c", "2", "--web-port", str(port))
    sup.wait_for(lambda: len([t for t in sup.child_tasks().values() if t]) == 2, 30, "two children with tasks")
    base = f"http://127.0.0.1:{port}"
    bad = [(b"bad", json.dumps({"n": -1, "bad": True}).encode(), p) for p in range(4)]
    produce(broker, f"{prefix}-in", records(0, N) + bad)  # n % 4: every partition, both children
    seen: Dict[str, Any] = {}

    def counted() -> bool:  # polled: the children send their values once a second
        seen.update(scrape(base))
        return (total(seen, "records_seen", "records_seen_total") >= N
                and total(seen, "shardsup_records_processed", "shardsup_records_processed_total") >= N + 4
                and total(seen, "shardsup_records_dead_lettered", "shardsup_records_dead_lettered_total") >= 4)

    sup.wait_for(counted, 40, "/metrics to count every record")
    assert total(seen, "records_seen", "records_seen_total") == N
    assert {s.labels["parity"]: s.value for s in seen["records_seen"].samples
            if s.name == "records_seen_total"} == {"even": N / 2, "odd": N / 2}
    assert all(s.labels["app"] == prefix for f in seen.values() for s in f.samples)
    processed = [s for s in seen["shardsup_records_processed"].samples if s.name.endswith("_total")]
    assert {(s.labels["task"], s.labels["topic"], s.labels["partition"]) for s in processed} == {
        (f"0_{p}", f"{prefix}-in", str(p)) for p in range(4)}
    assert sum(s.value for s in processed) == N + 4
    dead = {s.labels["task"]: s.value for s in seen["shardsup_records_dead_lettered"].samples
            if s.name.endswith("_total")}
    assert dead == {f"0_{p}": 1 for p in range(4)}
    assert total(seen, "record_n", "record_n_count") == N
    # the gauge is per child: both children processed records
    assert {s.labels["child"] for s in seen["last_n"].samples} == {"0", "1"}
    for name in ("shardsup_child_restarts", "shardsup_child_rss_bytes", "shardsup_child_cpu_percent"):
        assert {s.labels["child"] for s in seen[name].samples} == {"0", "1"}, name
    assert {s.labels["task"] for s in seen["shardsup_task_topic_lag"].samples} == {f"0_{p}" for p in range(4)}
    assert total(seen, "shardsup_rebalances", "shardsup_rebalances_total") >= 1
    assert "shardsup_commit_latency_seconds" in seen

    # a child killed: its counts stay, the new process's add to them
    before = total(seen, "records_seen", "records_seen_total")
    victim = next(pid for pid, tasks in sup.child_tasks().items() if tasks)
    os.kill(victim, signal.SIGKILL)
    sup.wait_for(lambda: len([p for p, t in sup.child_tasks().items() if t and p != victim]) == 2, 30,
                 "the killed child restarted")
    produce(broker, f"{prefix}-in", records(N, N + 100))
    readings = []

    def grown() -> bool:
        readings.append(total(scrape(base), "records_seen", "records_seen_total"))
        return readings[-1] >= N + 100

    sup.wait_for(grown, 40, "/metrics to count the records after the restart")
    assert all(b >= a for a, b in zip([before] + readings, readings)), f"went backwards: {readings}"
    assert sup.stop() == 0
