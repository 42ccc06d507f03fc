"""What the supervisor shows of itself: the snapshot and the one-line status.

:func:`snapshot` is the document behind ``shardsup status`` (the control socket),
``/status``, ``/metrics`` and ``/health`` (the web thread reads a copy the arbiter
refreshes every second); its schema is the one :func:`supervisor.status.format_status`
and :mod:`supervisor.web` read.  :func:`status_line` is systemd's ``STATUS=`` and the
``ready:`` log line.  Both take plain data (the slots, the supervisor's own fields), so
neither this module nor its callers import each other in a loop.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional

from shardworker.topology import Topology

from .children import ChildSlot
from .subtopologies import entries

NOT_JOINED: Dict[str, Any] = {"state": "not joined", "generation": None, "member_id": None,
                              "rebalances": 0}


def shown_state(slot: ChildSlot) -> str:
    """A slot's state as status shows it: ``restoring`` while its child restores."""
    return "restoring" if slot.alive and slot.restoring else slot.state


def status_line(slots: Iterable[ChildSlot]) -> str:
    """One line for systemd's STATUS= and the log."""
    slots = list(slots)
    running = sum(1 for s in slots if s.state == "running")
    tasks = sum(len(s.tasks) for s in slots)
    failed = [t for s in slots if s.state == "failed" for t in s.tasks]
    rate = sum(s.records_per_s for s in slots)
    line = f"{running}/{len(slots)} children running, {tasks} tasks, {rate:.0f} records/s"
    return line + (f", FAILED tasks {','.join(failed)}" if failed else "")


def snapshot(slots: Iterable[ChildSlot], *, app_id: str, broker: str, datadir: str,
             started_at: float, state: str, group: Optional[Dict[str, Any]],
             now: Optional[float] = None, topology: Optional[Topology] = None,
             kinds: Optional[Mapping[str, str]] = None,
             metrics: Optional[List[Dict[str, Any]]] = None) -> Dict[str, object]:
    """Everything ``shardsup status``, ``/status``, ``/metrics`` and ``/health`` show.
    ``group`` is the member's :meth:`~supervisor.membership.GroupMember.group_state`
    (None before there is a member).  With the app's ``topology`` (and ``kinds``:
    :func:`supervisor.subtopologies.topic_kinds`) each task also carries its
    ``subtopology`` and ``topic_lag`` (source topic → lag), and ``subtopologies`` lists
    them with their topics' lag over this supervisor's tasks.  ``metrics``
    (:func:`supervisor.metricstore.families`: the children's counters, histograms and
    gauges, merged) goes in as it is, for ``/metrics``."""
    now = time.monotonic() if now is None else now
    children = []
    tasks: Dict[str, Dict[str, Any]] = {}
    for slot in sorted(slots, key=lambda s: s.index):
        usage = slot.usage()
        lag = slot.stats.lag if slot.alive else {}
        topic_lag = slot.stats.topic_lag if slot.alive else {}
        shown = shown_state(slot)
        children.append({
            "index": slot.index, "pid": slot.pid, "tasks": list(slot.tasks), "state": shown,
            "uptime_s": round(now - slot.started_at, 3) if slot.alive else 0.0,
            "restarts": slot.restarts, "records_per_s": round(slot.records_per_s, 1),
            "records_total": slot.records_total, "errors_total": slot.errors_total,
            "lag": {t: lag.get(t) for t in slot.tasks},
            "rss_bytes": usage[0], "cpu_percent": usage[1], "last_error": slot.last_error})
        retry_in = (round(max(0.0, slot.retry_at - now), 1)
                    if slot.state == "failed" and slot.retry_at is not None else None)
        children[-1]["retry_in_s"] = retry_in
        for task in slot.tasks:
            tasks[task] = {"child": slot.index, "state": shown, "lag": lag.get(task)}
            if topology is not None:
                per = topic_lag.get(task) or {}
                tasks[task].update(subtopology=topology.subtopology(task).index, topic_lag={
                    topic: per.get(topic) for topic, _p in topology.task_partitions(task)})
            if slot.state == "failed":
                tasks[task].update(last_error=slot.last_error, retry_in_s=retry_in)
    doc: Dict[str, object] = {
        "supervisor": {"pid": os.getpid(), "app": app_id, "broker": broker,
                       "datadir": os.path.abspath(datadir),
                       "uptime_s": round(now - started_at, 3), "state": state,
                       "group": group if group is not None else dict(NOT_JOINED)},
        "children": children, "tasks": tasks}
    if metrics is not None:
        doc["metrics"] = metrics
    if topology is not None:
        doc["subtopologies"] = entries(topology, kinds or {}, tasks)
    return doc
