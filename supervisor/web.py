"""An optional HTTP endpoint for monitoring: ``/status``, ``/metrics``, ``/health``.

It runs in a daemon thread of the supervisor (``http.server.ThreadingHTTPServer``, one
thread per request), so a slow scraper never delays the main loop.  It only ever *reads*
the supervisor's state through the ``snapshot`` callable, which must be cheap,
thread-safe and return a fresh dict (the schema is the one of :mod:`supervisor.status`).

``/metrics`` is the Prometheus text exposition format 0.0.4, written by hand by
:func:`render_metrics` so that shardsup needs no Prometheus library at run time.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import UsageError

log = logging.getLogger("supervisor.web")

Snapshot = Callable[[], Dict[str, Any]]

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
#: Task states in which a task counts as healthy: it is (or will shortly be) processing.
HEALTHY_TASK_STATES = ("running", "restoring")
#: Child states in which ``shardsup_child_up`` is 0: no process is there to do work.
CHILD_DOWN_STATES = ("down", "failed")


# -- Prometheus text exposition ---------------------------------------------------------

def escape_label_value(value: str) -> str:
    r"""Label values escape ``\``, ``"`` and newline (exposition format 0.0.4)."""
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def escape_help(text: str) -> str:
    r"""HELP text escapes ``\`` and newline (but not ``"``)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, and Prometheus' NaN/+Inf/-Inf."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Family:
    """One metric family: HELP and TYPE once, then its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: List[Tuple[Dict[str, str], float]] = []

    def add(self, value: Any, **labels: Any) -> None:
        """Adds a sample; a value that is unknown (None, not a number) is left out, as
        Prometheus expects for a series that has no value right now."""
        if value is None or not isinstance(value, (int, float)):
            return
        self.samples.append(({k: str(v) for k, v in labels.items()}, value))

    def render(self, out: List[str]) -> None:
        out.append(f"# HELP {self.name} {escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for labels, value in self.samples:
            if labels:
                inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
                out.append(f"{self.name}{{{inner}}} {format_value(value)}")
            else:
                out.append(f"{self.name} {format_value(value)}")


def _children(snapshot: Dict[str, Any]) -> List[Dict[str, Any]]:
    return sorted(snapshot.get("children") or [], key=lambda c: c.get("index", 0))


def render_metrics(snapshot: Dict[str, Any]) -> str:
    """The snapshot in the Prometheus text format (pure: no I/O, no global registry).

    Record and error counters are per child, labelled with the child's index and its
    tasks (comma-separated), because that is the granularity the children report.  When
    every entry of ``snapshot["tasks"]`` carries ``records_total`` (and/or
    ``errors_total``) the counters are per task instead, labelled ``task`` and ``child``.
    Counters come from the children and restart from 0 when a child restarts; Prometheus'
    ``rate()``/``increase()`` handle such resets.
    """
    sup = snapshot.get("supervisor") or {}
    group = sup.get("group") or {}
    children = _children(snapshot)
    tasks: Dict[str, Dict[str, Any]] = snapshot.get("tasks") or {}

    info = _Family("shardsup_supervisor_info", "gauge",
                   "Always 1; the labels describe the supervisor.")
    info.add(1, app=sup.get("app", ""), broker=sup.get("broker", ""), pid=sup.get("pid", ""),
             state=sup.get("state", ""))
    sup_uptime = _Family("shardsup_supervisor_uptime_seconds", "gauge",
                         "Seconds since the supervisor started.")
    sup_uptime.add(sup.get("uptime_s"))
    rebalances = _Family("shardsup_rebalances_total", "counter",
                         "Consumer group rebalances this supervisor took part in.")
    rebalances.add(group.get("rebalances"))
    generation = _Family("shardsup_group_generation", "gauge",
                         "Generation of the consumer group this supervisor is a member of.")
    generation.add(group.get("generation"))

    records = _Family("shardsup_records_processed_total", "counter",
                      "Records processed (their outputs acknowledged by the broker).")
    errors = _Family("shardsup_errors_total", "counter",
                     "Records that failed (decode or agent error): dead-lettered or skipped.")
    per_task_records = bool(tasks) and all(isinstance(t.get("records_total"), int) for t in tasks.values())
    per_task_errors = bool(tasks) and all(isinstance(t.get("errors_total"), int) for t in tasks.values())
    if per_task_records or per_task_errors:
        for task_id, t in sorted(tasks.items()):
            if per_task_records:
                records.add(t.get("records_total"), task=task_id, child=t.get("child", ""))
            if per_task_errors:
                errors.add(t.get("errors_total"), task=task_id, child=t.get("child", ""))

    lag = _Family("shardsup_task_lag", "gauge",
                  "Records in the task's input partitions not yet processed (high watermark "
                  "minus processed offset); absent while unknown.")
    for task_id, t in sorted(tasks.items()):
        lag.add(t.get("lag"), task=task_id, child=t.get("child", ""))
    topic_lag = _Family("shardsup_task_topic_lag", "gauge",
                        "Records in the task's partition of one source topic not yet processed "
                        "(sum by topic for a repartition topic's lag); absent while unknown.")
    for task_id, t in sorted(tasks.items()):
        for topic, value in sorted((t.get("topic_lag") or {}).items()):
            topic_lag.add(value, task=task_id, topic=topic, subtopology=t.get("subtopology", ""),
                          child=t.get("child", ""))

    up = _Family("shardsup_child_up", "gauge",
                 "1 while the child process exists (starting, restoring, running or "
                 "stopping), 0 while it is down or failed.")
    restarts = _Family("shardsup_child_restarts_total", "counter",
                       "Times the supervisor restarted this child.")
    rss = _Family("shardsup_child_rss_bytes", "gauge", "Resident memory of the child process.")
    cpu = _Family("shardsup_child_cpu_percent", "gauge",
                  "CPU use of the child process in percent of one core.")
    uptime = _Family("shardsup_child_uptime_seconds", "gauge",
                     "Seconds since the child process started.")
    for child in children:
        index = child.get("index", "")
        alive = child.get("pid") is not None and child.get("state") not in CHILD_DOWN_STATES
        up.add(1 if alive else 0, child=index)
        restarts.add(child.get("restarts"), child=index)
        rss.add(child.get("rss_bytes"), child=index)
        cpu.add(child.get("cpu_percent"), child=index)
        uptime.add(child.get("uptime_s"), child=index)
        child_tasks = ",".join(child.get("tasks") or [])
        if not per_task_records:
            records.add(child.get("records_total"), child=index, tasks=child_tasks)
        if not per_task_errors:
            errors.add(child.get("errors_total"), child=index, tasks=child_tasks)

    out: List[str] = []
    for family in (info, sup_uptime, rebalances, generation, records, errors, lag, topic_lag, up,
                   restarts, rss, cpu, uptime):
        family.render(out)
    return "\n".join(out) + "\n"


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


__all__ = ["WebServer", "render_metrics", "health", "failed_tasks", "escape_label_value", "METRICS_CONTENT_TYPE"]
