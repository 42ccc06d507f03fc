"""User metrics: ``app.counter``, ``app.histogram``, ``app.gauge``, usable in agents.

A metric lives in each child process: an agent's ``.inc()``/``.observe()``/``.set()``
only changes a value in that process (a dict entry under a lock: no I/O).  Once a
second the child's heartbeat carries the *cumulative* values of the series that changed
since the last one (:meth:`MetricRegistry.changed`); the supervisor merges them over its
children and their restarts (:mod:`supervisor.metricstore`) and serves them on
``/metrics``: counters and histograms summed, gauges one series per child (label
``child``).  The API follows ``prometheus_client``'s (``.labels(**kv).inc()``) so that
a Faust or Prometheus user finds what they know (DESIGN.md, "Metrics").

Names are exposed as given (with the ``app`` label added); ``shardsup_`` is reserved
for shardsup's own metrics, which the worker keeps in a registry of its own with the
same classes.

On the wire a family is ``{"kind", "doc", "labels", "buckets"?, "series": [[label
values, value]]}``: a counter's or gauge's value is a number, a histogram's is
``[per-bucket counts (the last one: +Inf), sum]``.
"""
from __future__ import annotations

import bisect
import math
import re
import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
#: labels the supervisor adds to every user metric; a metric may not declare them
RESERVED_LABELS = ("app", "child", "le", "quantile")
RESERVED_PREFIX = "shardsup_"
#: prometheus_client's default buckets (seconds of a request, say)
DEFAULT_BUCKETS: Tuple[float, ...] = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5,
                                      5.0, 7.5, 10.0)

LabelValues = Tuple[str, ...]


class Metric:
    """A named family of series, one per combination of label values."""

    kind = ""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (),
                 registry: Optional["MetricRegistry"] = None) -> None:
        if not NAME.match(name):
            raise ValueError(f"metric name {name!r}: use letters, digits, '_' and ':'")
        for label in labels:
            if not LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"metric {name}: invalid label name {label!r}")
        self.name = name
        self.doc = doc
        self.labelnames: Tuple[str, ...] = tuple(labels)
        self._lock = threading.Lock()
        self._values: Dict[LabelValues, Any] = {}
        self._dirty: Set[LabelValues] = set()

    def labels(self, *values: Any, **kv: Any) -> "Child":
        """The series with these label values (by position or by name), as in
        ``prometheus_client``: ``requests.labels(path="/x").inc()``."""
        if values and kv:
            raise ValueError(f"metric {self.name}: label values by position or by name, not both")
        if kv:
            if set(kv) != set(self.labelnames):
                raise ValueError(f"metric {self.name}: labels {sorted(kv)} given, "
                                 f"{list(self.labelnames)} declared")
            values = tuple(kv[n] for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"metric {self.name}: {len(values)} label values for "
                             f"{len(self.labelnames)} labels")
        return Child(self, tuple(str(v) for v in values))

    def _unlabelled(self) -> LabelValues:
        if self.labelnames:
            raise ValueError(f"metric {self.name} has labels {list(self.labelnames)}: "
                             "use .labels(...) first")
        return ()

    def _zero(self) -> Any:
        return 0.0

    def _update(self, key: LabelValues, fn: Any) -> None:
        with self._lock:
            self._values[key] = fn(self._values.get(key, self._zero()))
            self._dirty.add(key)

    def _wire(self, value: Any) -> Any:
        return value

    def meta(self) -> Dict[str, Any]:
        return {"kind": self.kind, "doc": self.doc, "labels": list(self.labelnames)}

    def changed(self) -> Optional[Dict[str, Any]]:
        """The family with the series changed since the last call (cumulative values),
        or None when none changed."""
        with self._lock:
            if not self._dirty:
                return None
            series = [[list(k), self._wire(self._values[k])] for k in sorted(self._dirty)]
            self._dirty.clear()
        return {**self.meta(), "series": series}

    def value(self, *label_values: Any) -> Any:
        """This process's value of a series (for tests), or None when never touched."""
        return self._values.get(tuple(str(v) for v in label_values))


class Child:
    """One series of a metric (what ``.labels(...)`` returns)."""

    __slots__ = ("metric", "key")

    def __init__(self, metric: Metric, key: LabelValues) -> None:
        self.metric = metric
        self.key = key

    def inc(self, amount: float = 1.0) -> None:
        getattr(self.metric, "_inc")(self.key, amount)

    def dec(self, amount: float = 1.0) -> None:
        getattr(self.metric, "_dec")(self.key, amount)

    def set(self, value: float) -> None:
        getattr(self.metric, "_set")(self.key, value)

    def observe(self, value: float) -> None:
        getattr(self.metric, "_observe")(self.key, value)


class Counter(Metric):
    """A count that only goes up; exposed as ``<name>_total``, summed over children."""

    kind = "counter"

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (),
                 registry: Optional["MetricRegistry"] = None) -> None:
        if name.endswith("_total"):
            name = name[:-len("_total")]  # prometheus_client adds it back on exposition
        super().__init__(name, doc, labels, registry)

    def inc(self, amount: float = 1.0) -> None:
        self._inc(self._unlabelled(), amount)

    def _inc(self, key: LabelValues, amount: float) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name}: cannot go down ({amount})")
        self._update(key, lambda v: v + amount)

    def _set_total(self, key: LabelValues, total: float) -> None:
        """shardsup's own counters whose count is kept elsewhere (restored records)."""
        self._update(key, lambda v: max(v, total))


class Gauge(Metric):
    """A value that goes up and down; one series per child on ``/metrics``."""

    kind = "gauge"

    def inc(self, amount: float = 1.0) -> None:
        self._inc(self._unlabelled(), amount)

    def dec(self, amount: float = 1.0) -> None:
        self._inc(self._unlabelled(), -amount)

    def set(self, value: float) -> None:
        self._set(self._unlabelled(), value)

    def _inc(self, key: LabelValues, amount: float) -> None:
        self._update(key, lambda v: v + amount)

    def _dec(self, key: LabelValues, amount: float) -> None:
        self._update(key, lambda v: v - amount)

    def _set(self, key: LabelValues, value: float) -> None:
        self._update(key, lambda _v: float(value))


class Histogram(Metric):
    """Observations counted into buckets; summed over children (buckets, sum, count)."""

    kind = "histogram"

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (),
                 registry: Optional["MetricRegistry"] = None,
                 buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, doc, labels, registry)
        bounds = sorted(float(b) for b in buckets if not math.isinf(float(b)))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram {name}: buckets must be distinct and not empty")
        self.buckets: Tuple[float, ...] = tuple(bounds)

    def observe(self, value: float) -> None:
        self._observe(self._unlabelled(), value)

    def _zero(self) -> Any:
        return [[0] * (len(self.buckets) + 1), 0.0]

    def _observe(self, key: LabelValues, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)  # le: a value on a bound is in it

        def add(v: List[Any]) -> List[Any]:
            v[0][index] += 1
            v[1] += value
            return v
        self._update(key, add)

    def _wire(self, value: Any) -> Any:
        return [list(value[0]), value[1]]

    def meta(self) -> Dict[str, Any]:
        return {**super().meta(), "buckets": list(self.buckets)}


class MetricRegistry:
    """The metrics of one app (or shardsup's own, in a worker), by name."""

    def __init__(self, reserved_prefix: Optional[str] = RESERVED_PREFIX) -> None:
        self.metrics: Dict[str, Metric] = {}
        self._reserved = reserved_prefix

    def register(self, metric: Metric) -> Metric:
        """Adds ``metric``; declaring the same name again with the same kind and labels
        returns the first (a module imported twice), otherwise ValueError."""
        if self._reserved and metric.name.startswith(self._reserved):
            raise ValueError(f"metric {metric.name}: the prefix {self._reserved!r} is shardsup's")
        clash = [n for n in metric.labelnames if n in RESERVED_LABELS]
        if clash:
            raise ValueError(f"metric {metric.name}: label {clash[0]!r} is added by shardsup")
        existing = self.metrics.get(metric.name)
        if existing is not None:
            if (existing.kind, existing.labelnames) != (metric.kind, metric.labelnames):
                raise ValueError(f"metric {metric.name} declared twice, differently")
            return existing
        self.metrics[metric.name] = metric
        return metric

    def changed(self) -> Dict[str, Dict[str, Any]]:
        """Every family with series changed since the last call (see :meth:`Metric.changed`)."""
        out = {}
        for name, metric in self.metrics.items():
            family = metric.changed()
            if family is not None:
                out[name] = family
        return out


def own_metrics() -> MetricRegistry:
    """shardsup's own counters in a child: records per partition (counted once per
    chunk) and changelog records read per task while restoring (restore progress)."""
    registry = MetricRegistry(reserved_prefix=None)
    per_partition = ("topic", "partition")
    for name, doc, labels in (
            ("shardsup_records_processed", "Records processed (decoded and given to the agents).",
             per_partition),
            ("shardsup_records_dead_lettered", "Records that failed and went to the agent's "
             "dead-letter topic.", per_partition),
            ("shardsup_records_skipped", "Records that failed and were dropped (on_error=skip).",
             per_partition),
            ("shardsup_records_restored", "Changelog records read to restore a task's tables "
             "(restore progress).", ("task",))):
        registry.register(Counter(name, doc, labels))
    return registry


__all__ = ["Counter", "Gauge", "Histogram", "MetricRegistry", "DEFAULT_BUCKETS", "own_metrics"]
