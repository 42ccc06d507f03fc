"""Metrics (DESIGN.md, "Metrics"): the user metrics API (shardworker/metrics.py), their
merge in the supervisor over children and restarts (supervisor/metricstore.py), the
``prometheus_client`` collector over the snapshot (supervisor/web.py), and the Grafana
dashboard in docs/, whose every queried metric must be exposed."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Set

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardworker.app import App
from shardworker.metrics import MetricRegistry
from shardworker.protocol import Stats
from supervisor.children import ChildSlot
from supervisor.membership import COMMIT_BUCKETS
from supervisor.metricstore import IncarnationMetrics, MetricTotals, families
from supervisor.snapshot import snapshot
from supervisor.web import render_metrics
from shardworker.metrics import Histogram

pytestmark = pytest.mark.timeout(20)

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "grafana-dashboard.json")


def _app() -> App:
    return App("metrics-test", broker="localhost:1")


def _families(text: str) -> Dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _by_labels(family: Any, sample: str) -> Dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == sample}


# -- the API -------------------------------------------------------------------------

def test_counter_gauge_histogram_api_and_changed_series_only() -> None:
    app = _app()
    seen = app.counter("seen", "Records seen.", labels=("kind",))
    total = app.counter("all_total", "All.")
    size = app.gauge("size", "Size.")
    value = app.histogram("value", "Values.", buckets=(1, 10))
    seen.labels(kind="a").inc()
    seen.labels("b").inc(2)
    total.inc(3)
    size.set(5)
    size.dec(2)
    value.observe(1)      # on a bound: in its bucket (le)
    value.observe(5)
    value.observe(50)
    changed = app.metrics.changed()
    assert changed["seen"] == {"kind": "counter", "doc": "Records seen.", "labels": ["kind"],
                               "series": [[["a"], 1.0], [["b"], 2.0]]}
    assert changed["all"]["series"] == [[[], 3.0]]     # _total is added back on exposition
    assert changed["size"]["series"] == [[[], 3.0]]
    assert changed["value"]["buckets"] == [1.0, 10.0]
    assert changed["value"]["series"] == [[[], [[1, 1, 1], 56.0]]]
    assert app.metrics.changed() == {}, "nothing changed since"
    seen.labels(kind="a").inc()
    assert app.metrics.changed() == {"seen": {"kind": "counter", "doc": "Records seen.",
                                              "labels": ["kind"], "series": [[["a"], 2.0]]}}
    assert app.counter("seen", "again", labels=("kind",)) is seen  # a module imported twice


def test_api_errors() -> None:
    app = _app()
    seen = app.counter("seen", "Seen.", labels=("kind",))
    with pytest.raises(ValueError):
        seen.inc()                     # labels first
    with pytest.raises(ValueError):
        seen.labels(other="x")
    with pytest.raises(ValueError):
        seen.labels(kind="a").inc(-1)  # counters only go up
    with pytest.raises(ValueError):
        app.gauge("seen", "Seen.", labels=("kind",))
    with pytest.raises(ValueError):
        app.counter("shardsup_mine", "reserved prefix")
    with pytest.raises(ValueError):
        app.counter("bad-name", "not a Prometheus name")
    with pytest.raises(ValueError):
        app.gauge("g", "child is added by the supervisor", labels=("child",))


# -- the merge -------------------------------------------------------------------------

def _heartbeat(slot: ChildSlot, registry: MetricRegistry) -> None:
    slot.record_stats(Stats(metrics=json.loads(json.dumps(registry.changed()))))  # as on the wire


def _merged(totals: MetricTotals, slots: List[ChildSlot]) -> Dict[str, Any]:
    for slot in slots:
        totals.add(slot.take_metric_deltas())
    doc = {"supervisor": {"app": "p"}, "metrics": families(totals, [(s.index, s.metrics) for s in slots])}
    return _families(render_metrics(doc))


def test_counters_sum_over_children_and_never_go_back_after_a_restart() -> None:
    totals = MetricTotals()
    a, b = ChildSlot(0, ["0_0"]), ChildSlot(1, ["0_1"])
    reg_a, reg_b = _app(), _app()   # each child process has its own values
    seen_a = reg_a.counter("seen", "Seen.", labels=("kind",))
    seen_b = reg_b.counter("seen", "Seen.", labels=("kind",))
    seen_a.labels(kind="x").inc(3)
    seen_b.labels(kind="x").inc(4)
    _heartbeat(a, reg_a.metrics)
    _heartbeat(b, reg_b.metrics)
    assert _by_labels(_merged(totals, [a, b])["seen"], "seen_total") == {(("app", "p"), ("kind", "x")): 7}

    seen_a.labels(kind="x").inc(2)
    _heartbeat(a, reg_a.metrics)
    _heartbeat(a, reg_a.metrics)  # nothing changed: no double count
    assert _by_labels(_merged(totals, [a, b])["seen"], "seen_total") == {(("app", "p"), ("kind", "x")): 9}

    # child 0 restarts: a new process counts from 0; the sum goes on from 9
    a.metrics = IncarnationMetrics()  # what ChildSlot.spawn does
    reg_new = _app()
    seen_new = reg_new.counter("seen", "Seen.", labels=("kind",))
    seen_new.labels(kind="x").inc(1)
    _heartbeat(a, reg_new.metrics)
    assert _by_labels(_merged(totals, [a, b])["seen"], "seen_total") == {(("app", "p"), ("kind", "x")): 10}
    # and when slot 0 is gone altogether (its tasks moved), its counts stay
    assert _by_labels(_merged(totals, [b])["seen"], "seen_total") == {(("app", "p"), ("kind", "x")): 10}


def test_histograms_merge_and_gauges_are_per_child() -> None:
    totals = MetricTotals()
    slots = [ChildSlot(0, ["0_0"]), ChildSlot(1, ["0_1"])]
    for i, slot in enumerate(slots):
        app = _app()
        hist = app.histogram("latency", "Latency.", buckets=(0.1, 1.0))
        gauge = app.gauge("queue", "Queue length.")
        hist.observe(0.05 * (i + 1))   # 0.05 and 0.1: both in le=0.1
        hist.observe(5)
        gauge.set(10 + i)
        _heartbeat(slot, app.metrics)
    fam = _merged(totals, slots)
    hist = {(s.name, s.labels.get("le")): s.value for s in fam["latency"].samples}
    assert hist == {("latency_bucket", "0.1"): 2, ("latency_bucket", "1.0"): 2,
                    ("latency_bucket", "+Inf"): 4, ("latency_count", None): 4,
                    ("latency_sum", None): pytest.approx(10.15)}
    assert _by_labels(fam["queue"], "queue") == {(("app", "p"), ("child", "0")): 10,
                                                  (("app", "p"), ("child", "1")): 11}


# -- the collector over a representative snapshot ----------------------------------------

def representative_text() -> str:
    """/metrics of a supervisor with two children that processed, dead-lettered,
    skipped and restored records and whose app counts ``records_seen``."""
    from tests.unit.graphapps import shop  # an app with two sub-topologies
    topology = shop.app.topology
    totals = MetricTotals()
    slots = []
    for index, tasks in enumerate((["0_0", "1_0"], ["0_1", "1_1"])):
        slot = ChildSlot(index, tasks)
        slot.state = "running"
        own = MetricRegistry(reserved_prefix=None)
        from shardworker.metrics import Counter
        processed = own.register(Counter("shardsup_records_processed", "Processed.", ("topic", "partition")))
        dead = own.register(Counter("shardsup_records_dead_lettered", "Dead.", ("topic", "partition")))
        skipped = own.register(Counter("shardsup_records_skipped", "Skipped.", ("topic", "partition")))
        restored = own.register(Counter("shardsup_records_restored", "Restored.", ("task",)))
        topic = topology.subtopologies[0].sources[0]
        processed._inc((topic, str(index)), 100)
        dead._inc((topic, str(index)), 1)
        skipped._inc((topic, str(index)), 2)
        restored._inc((tasks[1],), 50)
        user = _app()
        user.counter("records_seen", "Records seen by the agent.").inc(100)
        slot.record_stats(Stats(processed=100, tasks=tasks, lag={t: 0 for t in tasks},
                                topic_lag={t: {s: 0 for s in topology.subtopology(t).sources} for t in tasks},
                                metrics={**user.metrics.changed(), **own.changed()}))
        slots.append(slot)
        totals.add(slot.take_metric_deltas())
    latency = Histogram("shardsup_commit_latency_seconds", "Commit latency.", buckets=COMMIT_BUCKETS)
    latency.observe(0.004)
    doc = snapshot(slots, app_id="shop", broker="b:1", datadir="d", started_at=0.0, state="running",
                   group={"state": "stable", "generation": 1, "member_id": "m", "rebalances": 1},
                   topology=topology,
                   metrics=families(totals, [(s.index, s.metrics) for s in slots], [latency],
                                    topology.task_id))
    for child in doc["children"]:  # type: ignore[union-attr]
        child.update(pid=1000 + child["index"], rss_bytes=50_000_000, cpu_percent=12.5)  # no process here
    json.dumps(doc)  # the snapshot is JSON (shardsup status, /status)
    return render_metrics(doc)


def test_the_collector_shows_per_task_metrics_with_their_labels() -> None:
    from tests.unit.graphapps import shop
    fam = _families(representative_text())
    topic = shop.app.topology.subtopologies[0].sources[0]
    for name in ("shardsup_records_processed", "shardsup_records_dead_lettered", "shardsup_records_skipped"):
        assert {tuple(sorted(s.labels.items())) for s in fam[name].samples} == {
            (("app", "shop"), ("partition", "0"), ("task", "0_0"), ("topic", topic)),
            (("app", "shop"), ("partition", "1"), ("task", "0_1"), ("topic", topic))}, name
    assert sum(s.value for s in fam["shardsup_records_processed"].samples) == 200
    assert _by_labels(fam["shardsup_records_restored"], "shardsup_records_restored_total") == {
        (("app", "shop"), ("task", "1_0")): 50, (("app", "shop"), ("task", "1_1")): 50}
    assert _by_labels(fam["records_seen"], "records_seen_total") == {(("app", "shop"),): 200}
    assert {s.labels["partition"] for s in fam["shardsup_task_topic_lag"].samples} == {"0", "1"}
    assert fam["shardsup_commit_latency_seconds"].type == "histogram"
    for family in fam.values():
        assert all(s.labels.get("app") == "shop" for s in family.samples), family.name


# -- the dashboard -----------------------------------------------------------------------

#: PromQL words that are not metric names
PROMQL_WORDS = {"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "by", "without",
                "histogram_quantile", "label_values", "on", "ignoring", "group_left", "group_right",
                "and", "or", "unless", "offset", "topk", "bottomk", "delta", "deriv", "abs",
                "clamp_min", "clamp_max", "sort", "sort_desc", "time", "vector", "scalar", "bool"}


def metric_names(expr: str) -> Set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label
    matchers, ranges, grouping clauses, functions and numbers are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,[^)]*\)", r"\1", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = match.group(0)
        after = expr[match.end():].lstrip()
        if word in PROMQL_WORDS or after.startswith("(") or word.startswith("$"):
            continue
        names.add(word)
    return names


def dashboard_exprs(dashboard: Dict[str, Any]) -> List[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_metric_names_are_found_in_promql() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (app, le) (rate(x_bucket{app=~"$app"}[5m])))') == {"x_bucket"}
    assert metric_names("label_values(shardsup_supervisor_info, app)") == {"shardsup_supervisor_info"}
    assert metric_names("sum(a_total) / sum(b_count)") == {"a_total", "b_count"}


def test_every_metric_the_grafana_dashboard_queries_is_exposed() -> None:
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    exposed = {s.name for f in text_string_to_metric_families(representative_text()) for s in f.samples}
    queried = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard)))
    assert len(queried) >= 10, queried
    assert queried <= exposed, f"the dashboard queries metrics /metrics lacks: {sorted(queried - exposed)}"


@pytest.mark.timeout(20)
def test_late_records_of_windowed_tables_are_counted_per_task_and_table_without_going_back():
    """Late records (writes to closed windows) reach the heartbeat's metrics as a counter
    per task and table, as the increments of the child's count; a task closed and
    reopened keeps its count (TaskStates.late_counts only grows)."""
    from types import SimpleNamespace

    from shardworker import App
    from shardworker.worker import Worker

    late = {"1_0": {"per_minute": 2}}
    worker = Worker.__new__(Worker)
    Worker.__init__(worker, App("m", broker="kafka://127.0.0.1:9"), channel=None,  # type: ignore[arg-type]
                    bootstrap="127.0.0.1:9", index=0)
    worker.state = SimpleNamespace(enabled=True, restorer=SimpleNamespace(restored={}),
                                   late_counts=lambda: late)
    sent = worker.changed_metrics()["shardsup_late_records"]["series"]
    assert sent == [[["1_0", "per_minute"], 2]]
    late["1_0"]["per_minute"] = 5
    assert worker.changed_metrics()["shardsup_late_records"]["series"] == [[["1_0", "per_minute"], 5]]
    assert "shardsup_late_records" not in worker.changed_metrics()  # nothing new

    from shardworker.state import TaskStates

    states = TaskStates.__new__(TaskStates)
    states._late_closed = {}
    open_task = SimpleNamespace(late={"per_minute": 4}, store=None, abort=lambda: None,
                                close=lambda: None)
    states.tasks, states.by_partition = {"1_0": open_task}, {}
    assert states.late_counts() == {"1_0": {"per_minute": 4}}
    states.close("1_0")
    reopened = SimpleNamespace(late={"per_minute": 1})
    states.tasks = {"1_0": reopened}  # its count starts from 0 when it opens again
    assert states.late_counts() == {"1_0": {"per_minute": 5}}
