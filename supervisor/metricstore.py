"""The children's metrics, merged in the supervisor (DESIGN.md, "Metrics").

Each heartbeat of a child carries the cumulative values, in that process, of the series
that changed (:mod:`shardworker.metrics`).  :class:`IncarnationMetrics` (one per child
process: a slot starts a fresh one at each spawn) turns them into increments;
:class:`MetricTotals` (one per supervisor) adds the increments of counters and
histograms up, so a sum over every child process this supervisor ran never goes
backwards, whether a child restarts, crashes or its slot is dropped.  Gauges are not
summed: each child's live values are shown with a ``child`` label.

:func:`families` is the ``metrics`` part of the snapshot, plain JSON data that
:mod:`supervisor.web` exposes: a list of ``{"name", "kind", "doc", "labels",
"buckets"?, "series"}``, each series ``{"labels": {...}, "value": v}`` or, for a
histogram, ``{"labels", "buckets": [cumulative counts, +Inf last], "sum", "count"}``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from shardworker.metrics import Metric, own_metrics

LabelValues = Tuple[str, ...]
Family = Dict[str, Any]


def _minus(new: Any, old: Any) -> Any:
    """``new - old`` of a counter (a number) or a histogram (``[counts, sum]``)."""
    if isinstance(new, list):
        if not isinstance(old, list) or len(old[0]) != len(new[0]):
            return new
        return [[a - b for a, b in zip(new[0], old[0])], new[1] - old[1]]
    return new - (old if isinstance(old, (int, float)) else 0)


class IncarnationMetrics:
    """What one child process sent so far: the last cumulative value of each series."""

    def __init__(self) -> None:
        self.meta: Dict[str, Family] = {}
        self.last: Dict[str, Dict[LabelValues, Any]] = {}

    def update(self, families: Dict[str, Family]) -> Dict[str, Family]:
        """Takes a heartbeat's families; returns the counters' and histograms' increments
        since the last heartbeat (same shape).  A value lower than the last one (cannot
        happen within a process) counts as a fresh start."""
        deltas: Dict[str, Family] = {}
        for name, family in families.items():
            meta = {k: v for k, v in family.items() if k != "series"}
            if self.meta.get(name, meta) != meta:
                self.last.pop(name, None)  # declared differently (new code): start over
            self.meta[name] = meta
            last = self.last.setdefault(name, {})
            changes = []
            for labels, value in family.get("series") or []:
                key = tuple(str(v) for v in labels)
                if meta.get("kind") != "gauge":
                    delta = _minus(value, last.get(key))
                    if _negative(delta):
                        delta = value
                    changes.append([key, delta])
                last[key] = value
            if changes:
                deltas[name] = {**meta, "series": changes}
        return deltas

    def gauges(self) -> Dict[str, Tuple[Family, Dict[LabelValues, Any]]]:
        """This process's gauges: name → (meta, label values → value)."""
        return {n: (m, self.last.get(n, {})) for n, m in self.meta.items() if m.get("kind") == "gauge"}


def _negative(delta: Any) -> bool:
    if isinstance(delta, list):
        return any(c < 0 for c in delta[0])
    return bool(delta < 0)


class MetricTotals:
    """Counters and histograms summed over every child process of this supervisor."""

    def __init__(self) -> None:
        self.meta: Dict[str, Family] = {}
        self.values: Dict[str, Dict[LabelValues, Any]] = {}

    def add(self, deltas: Iterable[Dict[str, Family]]) -> None:
        for batch in deltas:
            for name, family in batch.items():
                meta = {k: v for k, v in family.items() if k != "series"}
                if self.meta.get(name, meta) != meta:
                    # a histogram's buckets or a metric's labels changed (new code after a
                    # HUP): the old series cannot be merged with the new ones
                    self.values.pop(name, None)
                self.meta[name] = meta
                values = self.values.setdefault(name, {})
                for key, delta in family["series"]:
                    old = values.get(key)
                    if isinstance(delta, list):
                        values[key] = ([[a + b for a, b in zip(old[0], delta[0])], old[1] + delta[1]]
                                       if old is not None else [list(delta[0]), delta[1]])
                    else:
                        values[key] = (old or 0) + delta


TaskOf = Callable[[str, int], str]


def families(totals: MetricTotals, children: Iterable[Tuple[int, IncarnationMetrics]],
             own: Sequence[Metric] = (), task_of: Optional[TaskOf] = None) -> List[Family]:
    """The snapshot's ``metrics``: the totals (shardsup's own counters even before a
    child counted anything), each live child's gauges (label ``child``), and the
    supervisor's ``own`` metrics.  With ``task_of`` a family
    labelled ``topic`` and ``partition`` also gets the ``task`` label."""
    out: List[Family] = []
    for metric in own_metrics().metrics.values():  # shown before a child counted anything
        if metric.name not in totals.meta:
            out.append(_family(metric.name, metric.meta(), list(metric.labelnames), [], task_of))
    for name in sorted(totals.meta):
        meta = totals.meta[name]
        out.append(_family(name, meta, list(meta.get("labels") or []),
                           [(list(k), v) for k, v in sorted(totals.values.get(name, {}).items())],
                           task_of))
    gauges: Dict[str, Tuple[Family, List[Tuple[List[str], Any]]]] = {}
    for index, incarnation in children:
        for name, (meta, values) in incarnation.gauges().items():
            entry = gauges.setdefault(name, (meta, []))
            if entry[0] == meta:
                entry[1].extend(([*k, str(index)], v) for k, v in sorted(values.items()))
    for name in sorted(gauges):
        meta, series = gauges[name]
        out.append(_family(name, meta, [*(meta.get("labels") or []), "child"], series, task_of))
    for metric in own:
        meta = metric.meta()
        out.append(_family(metric.name, meta, list(metric.labelnames),
                           [(list(k), metric._wire(v)) for k, v in sorted(metric._values.items())],
                           task_of))
    return out


def _family(name: str, meta: Family, labels: List[str], series: List[Tuple[List[str], Any]],
            task_of: Optional[TaskOf]) -> Family:
    with_task = task_of is not None and "topic" in labels and "partition" in labels \
        and "task" not in labels
    shown: List[Dict[str, Any]] = []
    for values, value in series:
        named = dict(zip(labels, values))
        if with_task:
            assert task_of is not None
            try:
                named = {"task": task_of(named["topic"], int(named["partition"])), **named}
            except (KeyError, ValueError):
                named = {"task": "", **named}
        if isinstance(value, list):
            counts, total = value
            cumulative, running = [], 0
            for count in counts:
                running += count
                cumulative.append(running)
            shown.append({"labels": named, "buckets": cumulative, "sum": total, "count": running})
        else:
            shown.append({"labels": named, "value": value})
    family: Family = {"name": name, "kind": meta.get("kind"), "doc": meta.get("doc", ""),
                      "labels": (["task"] if with_task else []) + labels, "series": shown}
    if "buckets" in meta:
        family["buckets"] = list(meta["buckets"])
    return family


__all__ = ["IncarnationMetrics", "MetricTotals", "families"]
