"""An optional HTTP endpoint for monitoring: ``/status``, ``/metrics``, ``/health``.

It runs in a daemon thread of the supervisor (``http.server.ThreadingHTTPServer``, one
thread per request), so a slow scraper never delays the main loop.  It only ever *reads*
the supervisor's state through the ``snapshot`` callable, which must be cheap,
thread-safe and return a fresh dict (the schema is the one of :mod:`supervisor.status`).

``/metrics`` is the Prometheus text exposition format 0.0.4, written by
``prometheus_client`` from a custom collector over the snapshot
(:class:`SnapshotCollector`).
"""
from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .errors import UsageError

log = logging.getLogger("supervisor.web")

Snapshot = Callable[[], Dict[str, Any]]

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
#: Task states in which a task counts as healthy: it is (or will shortly be) processing.
HEALTHY_TASK_STATES = ("running", "restoring")
#: Child states in which ``shardsup_child_up`` is 0: no process is there to do work.
CHILD_DOWN_STATES = ("down", "failed")


# -- Prometheus exposition (prometheus_client over the snapshot) -------------------------

def _app(snapshot: Dict[str, Any]) -> str:
    return str((snapshot.get("supervisor") or {}).get("app", ""))


def _children(snapshot: Dict[str, Any]) -> List[Dict[str, Any]]:
    return sorted(snapshot.get("children") or [], key=lambda c: c.get("index", 0))


def _number(value: Any) -> bool:
    """A sample value: a number (None, an unknown lag, is left out, as Prometheus expects
    of a series that has no value right now)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _partition(task_id: str) -> str:
    """Task ``<i>_<p>`` reads partition *p* of each of its topics."""
    return task_id.rsplit("_", 1)[-1]


class SnapshotCollector:
    """A ``prometheus_client`` collector over the supervisor's snapshot (DESIGN.md,
    "Metrics"): the supervisor's and children's figures, each task's lag, and the
    merged counters, histograms and gauges of the children (shardsup's own per-partition
    counts and the app's metrics, :mod:`supervisor.metricstore`).  Every metric has
    the ``app`` label."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        app = _app(snap)
        sup = snap.get("supervisor") or {}
        group = sup.get("group") or {}
        tasks: Dict[str, Dict[str, Any]] = snap.get("tasks") or {}

        info = GaugeMetricFamily("shardsup_supervisor_info", "Always 1; the labels describe the "
                                 "supervisor.", labels=["app", "broker", "pid", "state"])
        info.add_metric([app, str(sup.get("broker", "")), str(sup.get("pid", "")),
                         str(sup.get("state", ""))], 1)
        yield info
        for name, kind, doc, value in (
                ("shardsup_supervisor_uptime_seconds", GaugeMetricFamily,
                 "Seconds since the supervisor started.", sup.get("uptime_s")),
                ("shardsup_rebalances", CounterMetricFamily,
                 "Consumer group rebalances this supervisor took part in.", group.get("rebalances")),
                ("shardsup_group_generation", GaugeMetricFamily,
                 "Generation of the consumer group this supervisor is a member of.",
                 group.get("generation"))):
            family = kind(name, doc, labels=["app"])
            if _number(value):
                family.add_metric([app], value)
            yield family

        lag = GaugeMetricFamily("shardsup_task_lag", "Records in the task's input partitions not "
                                "yet processed (high watermark minus processed offset); absent "
                                "while unknown.", labels=["app", "task", "child"])
        topic_lag = GaugeMetricFamily(
            "shardsup_task_topic_lag", "Records in the task's partition of one source topic not "
            "yet processed (sum by topic for a repartition topic's lag); absent while unknown.",
            labels=["app", "task", "topic", "partition", "subtopology", "child"])
        restoring = GaugeMetricFamily("shardsup_task_restoring", "1 while the task's tables are "
                                      "being restored from their changelogs, else 0.",
                                      labels=["app", "task"])
        for task_id, t in sorted(tasks.items()):
            child = str(t.get("child", ""))
            if _number(t.get("lag")):
                lag.add_metric([app, task_id, child], t["lag"])
            for topic, value in sorted((t.get("topic_lag") or {}).items()):
                if _number(value):
                    topic_lag.add_metric([app, task_id, topic, _partition(task_id),
                                          str(t.get("subtopology", "")), child], value)
            restoring.add_metric([app, task_id], 1 if t.get("state") == "restoring" else 0)
        yield lag
        yield topic_lag
        yield restoring

        children = _children(snap)
        per_child = [
            ("shardsup_child_up", GaugeMetricFamily, "1 while the child process exists "
             "(starting, restoring, running or stopping), 0 while it is down or failed.", None),
            ("shardsup_child_restarts", CounterMetricFamily,
             "Times the supervisor restarted this child.", "restarts"),
            ("shardsup_child_rss_bytes", GaugeMetricFamily, "Resident memory of the child process.",
             "rss_bytes"),
            ("shardsup_child_cpu_percent", GaugeMetricFamily,
             "CPU use of the child process in percent of one core.", "cpu_percent"),
            ("shardsup_child_uptime_seconds", GaugeMetricFamily,
             "Seconds since the child process started.", "uptime_s"),
            ("shardsup_errors", CounterMetricFamily, "Records of the child's tasks that failed "
             "(decode or agent error, or an output too large): dead-lettered or skipped.",
             "errors_total")]
        for name, kind, doc, key in per_child:
            family = kind(name, doc, labels=["app", "child"])
            for child in children:
                index = str(child.get("index", ""))
                if key is None:
                    alive = child.get("pid") is not None and child.get("state") not in CHILD_DOWN_STATES
                    family.add_metric([app, index], 1 if alive else 0)
                elif _number(child.get(key)):
                    family.add_metric([app, index], child[key])
            yield family

        for merged in snap.get("metrics") or []:
            family = _merged_family(app, merged)
            if family is not None:
                yield family


def _merged_family(app: str, merged: Dict[str, Any]) -> Optional[Metric]:
    """One family of the snapshot's ``metrics`` (:func:`supervisor.metricstore.families`)
    with the ``app`` label first."""
    labels = ["app", *merged.get("labels", [])]
    name, doc, kind = merged["name"], merged.get("doc", ""), merged.get("kind")
    family: Metric
    if kind == "histogram":
        bounds = [*(floatToGoString(b) for b in merged.get("buckets", [])), "+Inf"]
        family = HistogramMetricFamily(name, doc, labels=labels)
        for series in merged.get("series", []):
            values = [app, *(str(series["labels"].get(n, "")) for n in labels[1:])]
            family.add_metric(values, list(zip(bounds, series["buckets"])), series["sum"])
        return family
    if kind not in ("counter", "gauge"):
        return None
    family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=labels)
    for series in merged.get("series", []):
        if _number(series.get("value")):
            family.add_metric([app, *(str(series["labels"].get(n, "")) for n in labels[1:])],
                              series["value"])
    return family


def render_metrics(snapshot: Dict[str, Any]) -> str:
    """The snapshot in the Prometheus text format 0.0.4 (``prometheus_client``'s
    ``generate_latest`` on a private registry: no global state, no I/O)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))  # type: ignore[arg-type]
    return generate_latest(registry).decode("utf-8")


# -- health ---------------------------------------------------------------------------

def health(snapshot: Dict[str, Any]) -> Tuple[bool, Dict[str, Any]]:
    """(healthy, body): healthy when the supervisor is running and every task it owns is
    running or restoring.  A supervisor that owns no task (more members than partitions)
    is healthy.  The reason names the tasks that are not, grouped by state."""
    sup_state = (snapshot.get("supervisor") or {}).get("state")
    if sup_state != "running":
        return False, {"status": "unhealthy", "reason": f"supervisor is {sup_state or 'unknown'}"}
    bad: Dict[str, List[str]] = {}
    for task_id, t in sorted((snapshot.get("tasks") or {}).items()):
        state = str((t or {}).get("state"))
        if state not in HEALTHY_TASK_STATES:
            bad.setdefault(state, []).append(task_id)
    if bad:
        reason = "; ".join(f"{state}: {','.join(ids)}" for state, ids in sorted(bad.items()))
        body: Dict[str, Any] = {"status": "unhealthy", "reason": f"tasks not running: {reason}"}
        failed = failed_tasks(snapshot)
        if failed:
            body["failed"] = failed
        return False, body
    return True, {"status": "ok"}


def failed_tasks(snapshot: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Each failed task's last error and the seconds until it is tried again: what an
    operator (or an orchestrator reading ``/health``) needs to act on a failure."""
    return {task_id: {"last_error": t.get("last_error"), "retry_in_s": t.get("retry_in_s")}
            for task_id, t in sorted((snapshot.get("tasks") or {}).items())
            if (t or {}).get("state") == "failed"}


# -- server ---------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    server_version = "shardsup"
    sys_version = ""
    protocol_version = "HTTP/1.0"
    timeout = 10  # a client that stalls mid-request frees its thread after this

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        route = self.path.split("?", 1)[0].rstrip("/") or "/"
        if route not in ("/status", "/metrics", "/health"):
            self._send(404, JSON_CONTENT_TYPE, _json({"error": f"no such path {route}",
                                                     "paths": ["/status", "/metrics", "/health"]}))
            return
        try:
            snapshot = self.server.snapshot()
        except Exception as exc:  # noqa: BLE001 - a monitoring request must not kill anything
            log.exception("web: snapshot failed")
            self._send(500, JSON_CONTENT_TYPE, _json({"error": f"{type(exc).__name__}: {exc}"}))
            return
        if route == "/status":
            self._send(200, JSON_CONTENT_TYPE, _json(snapshot))
        elif route == "/metrics":
            self._send(200, METRICS_CONTENT_TYPE, render_metrics(snapshot).encode("utf-8"))
        else:
            ok, body = health(snapshot)
            self._send(200 if ok else 503, JSON_CONTENT_TYPE, _json(body))

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base
        log.debug("web %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # TIME_WAIT only; a live listener still gives EADDRINUSE

    def __init__(self, address: Tuple[str, int], snapshot: Snapshot, family: int) -> None:
        self.address_family = family
        self.snapshot = snapshot
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("web: error serving %s", client_address, exc_info=True)


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, default=str) + "\n").encode("utf-8")


class WebServer:
    """``/status``, ``/metrics`` and ``/health`` on ``host:port`` in a daemon thread.

    ``start()`` binds (a :class:`UsageError` with one line if it cannot) and serves;
    ``stop()`` stops serving and closes the socket.  ``port`` is the bound port (useful
    with port 0).
    """

    def __init__(self, host: str, port: int, snapshot: Snapshot) -> None:
        self.host = host
        self.port = port
        self.snapshot = snapshot
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self._server is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            server = _Server((self.host, self.port), self.snapshot, family)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"web port {self.host}:{self.port} is in use") from None
            raise UsageError(f"cannot listen on web port {self.host}:{self.port}: "
                             f"{exc.strerror or exc}") from None
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="shardsup-web", daemon=True)
        self._thread.start()
        log.info("web endpoint on http://%s:%d (/status, /metrics, /health)",
                 f"[{self.host}]" if family == socket.AF_INET6 else self.host, self.port)

    def stop(self) -> None:
        """Stops serving (waits at most a poll interval plus in-flight requests' writes)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(5)

    def __enter__(self) -> "WebServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["WebServer", "SnapshotCollector", "render_metrics", "health", "failed_tasks",
           "METRICS_CONTENT_TYPE"]
