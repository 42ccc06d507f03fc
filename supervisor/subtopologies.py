"""The app's sub-topologies as status and dumps show them: which topics each one reads
(and which of those the app feeds itself through a re-keying), its tables, the tasks this
supervisor holds, and the lag of each topic over those tasks.

Pure: plain data in, plain data (or one line of text) out, so ``shardsup status`` can
render a snapshot from a supervisor of another version and the tests need no broker.
DESIGN.md, "Sub-topologies".
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from shardworker.topology import Topology, task_sort_key

if TYPE_CHECKING:  # pragma: no cover
    from shardworker.app import App

#: a topic a ``group_by`` re-keys into: ``<app>-<name>-repartition``
REPARTITION = "repartition"
#: a declared topic an agent re-keys into with ``through()``
THROUGH = "through"
#: any other source topic
SOURCE = "source"


def topic_kinds(app: "App") -> Dict[str, str]:
    """Topic → :data:`REPARTITION` or :data:`THROUGH` for the topics the app re-keys into
    (others are absent).  Reads the app's graph, so call it after ``app.topology``."""
    kinds: Dict[str, str] = {}
    for agent in app.agents:
        regroup = getattr(agent, "regroup", None)
        if regroup is not None:
            kinds[regroup.topic] = THROUGH if regroup.kind == "through" else REPARTITION
    for name, topic in app.topics.items():
        if getattr(topic, "like", None) is not None:
            kinds[name] = REPARTITION
    return kinds


def describe(index: Any, topics: Sequence[Mapping[str, Any]], tables: Iterable[str]) -> str:
    """``sub-topology 1: p-by-customer-repartition (repartition), p-customers; tables
    by_customer, names`` from the entries of :func:`entries` (``name`` and ``kind``)."""
    names = ", ".join(str(t.get("name", "?")) + (f" ({t['kind']})" if t.get("kind", SOURCE) != SOURCE else "")
                      for t in topics) or "-"
    tables = list(tables)
    return f"sub-topology {index}: {names}" + (f"; tables {', '.join(tables)}" if tables else "")


def entries(topology: Topology, kinds: Mapping[str, str],
            tasks: Mapping[str, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One JSON-ready entry per sub-topology: ``index``, ``topics`` (``name``, ``kind``,
    ``lag``: records behind summed over this supervisor's tasks whose lag for the topic is
    known, None when none is, and ``unknown``: how many of them are not known),
    ``tables`` and ``tasks`` (this supervisor's, in order).  ``tasks`` maps a task to its
    snapshot entry, whose ``topic_lag`` is topic → lag."""
    out: List[Dict[str, Any]] = []
    for sub in topology.subtopologies:
        held = sorted((t for t in tasks if _subtopology_of(t) == sub.index), key=task_sort_key)
        topics = []
        for topic in sub.sources:
            known = [lag for lag in ((tasks[t].get("topic_lag") or {}).get(topic) for t in held)
                     if isinstance(lag, int)]
            topics.append({"name": topic, "kind": kinds.get(topic, SOURCE),
                           "lag": sum(known) if known else None,
                           "unknown": len(held) - len(known)})
        out.append({"index": sub.index, "topics": topics, "tables": list(sub.tables),
                    "tasks": held})
    return out


def _subtopology_of(task: str) -> Optional[int]:
    head = task.partition("_")[0]
    return int(head) if head.isdigit() else None


def format_lag(lag: Any, unknown: Any = 0) -> str:
    """``12``; ``12+?`` when some partitions' lag is not known yet; ``-`` when none is."""
    if not isinstance(lag, int) or isinstance(lag, bool):
        return "-"
    return f"{lag}+?" if isinstance(unknown, int) and unknown > 0 else str(lag)


def format_groups(snapshot: Mapping[str, Any]) -> List[str]:
    """The text of ``shardsup status`` below the children: a line per sub-topology, each
    task it has here under it (child, state, lag, and per topic when it reads several),
    then a line per repartition or ``through`` topic with its lag.  Empty for a snapshot
    without ``subtopologies`` (a supervisor of an older version)."""
    subs = snapshot.get("subtopologies")
    if not isinstance(subs, list):
        return []
    tasks: Mapping[str, Any] = snapshot.get("tasks") or {}
    lines: List[str] = []
    rekeyed: List[Tuple[Mapping[str, Any], int]] = []
    for sub in subs:
        topics = sub.get("topics") or []
        lines.append(describe(sub.get("index", "?"), topics, sub.get("tables") or []))
        held = sub.get("tasks") or []
        rekeyed += [(t, len(held)) for t in topics if t.get("kind", SOURCE) != SOURCE]
        if not held:
            lines.append("  no tasks here")
        rows = []
        for task in held:
            info = tasks.get(task) or {}
            per = info.get("topic_lag") or {}
            row = [task, f"child {info.get('child', '-')}", str(info.get("state", "-")),
                   f"lag {format_lag(info.get('lag'))}"]
            if len(topics) > 1 and per:
                row.append("(" + ", ".join(f"{t.get('name')} {format_lag(per.get(t.get('name')))}"
                                           for t in topics) + ")")
            rows.append(row)
        widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows), default=0))]
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    for topic, count in rekeyed:
        lines.append(f"{topic.get('kind')} topic {topic.get('name')}: lag "
                     f"{format_lag(topic.get('lag'), topic.get('unknown'))} "
                     f"over {count} task{'' if count == 1 else 's'} here")
    return lines


__all__ = ["topic_kinds", "describe", "entries", "format_lag", "format_groups",
           "REPARTITION", "THROUGH", "SOURCE"]
