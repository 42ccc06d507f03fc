"""Traceback reports: every thread of the supervisor and of every child, in one text.

Children register ``faulthandler`` for USR1 with a trace file under the datadir, so a
child answers even when its agent is stuck in a long call: the handler writes from the
signal itself.  The supervisor sends USR1, reads what each file gained, and adds its own
threads, the app's sub-topologies and what it knows of each child (tasks, offsets).

Every file here is private (0600, in 0700 folders) and written without following a
symbolic link: a link planted in the place of a trace or dump file is removed and a new
file created (these files are ours to rewrite), never written through.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from shardworker.logs import open_private
from shardworker.topology import TopicPartitionKey, Topology

from .children import ChildSlot
from .subtopologies import SOURCE, describe

TRACE_WAIT = 1.0  # seconds to wait for a child's handler to write


def trace_path(datadir: str, index: int) -> str:
    """Where child ``index`` writes its tracebacks; a symbolic link there is removed (the
    child opens the file with ``O_NOFOLLOW``, which would fail on it)."""
    os.makedirs(os.path.join(datadir, "traces"), mode=0o700, exist_ok=True)
    path = os.path.join(datadir, "traces", f"child-{index}.trace")
    if os.path.islink(path):
        os.unlink(path)
    return path


def write_new(path: str, text: str) -> None:
    """Writes ``text`` to a new private file at ``path``, replacing whatever is there
    (a symbolic link included: it is removed, not followed)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_EXCL), "w") as f:
        f.write(text)


def latest_dump_path(datadir: str) -> str:
    return os.path.join(datadir, "dump-latest.txt")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_growth(starts: Dict[str, int]) -> Dict[str, str]:
    """Waits until each file grew and then stopped growing; returns the new text."""
    deadline = time.monotonic() + TRACE_WAIT
    last = dict(starts)
    settled: Dict[str, bool] = {p: False for p in starts}
    while time.monotonic() < deadline and not all(settled.values()):
        time.sleep(0.05)
        for path in starts:
            size = _size(path)
            settled[path] = size > starts[path] and size == last[path]
            last[path] = size
    texts = {}
    for path, start in starts.items():
        try:
            with open(path, "rb") as f:
                f.seek(start)
                texts[path] = f.read().decode(errors="replace")
        except OSError:
            texts[path] = ""
    return texts


def collect_trace(slot: ChildSlot) -> str:
    """Signals one child and returns the tracebacks it wrote."""
    if not slot.trace_path or slot.pid is None:
        return "(no process)"
    start = _size(slot.trace_path)
    slot.signal(signal.SIGUSR1)
    return _read_growth({slot.trace_path: start})[slot.trace_path] or "(no answer)"


def own_threads() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {names.get(ident, ident)} (most recent call last):\n"
                     + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


def subtopology_lines(topology: Topology, kinds: Mapping[str, str]) -> List[str]:
    """A line per sub-topology: its topics (repartition ones marked) and tables."""
    return ["  " + describe(sub.index, [{"name": t, "kind": kinds.get(t, SOURCE)} for t in sub.sources],
                            sub.tables) for sub in topology.subtopologies]


def task_offset_lines(tasks: Sequence[str], offsets: Mapping[TopicPartitionKey, int],
                      topology: Topology) -> List[str]:
    """``offsets:`` then a line per task: its sub-topology and each of its partitions'
    offset (``?``: unknown to the supervisor; ``-``: none yet, a logical offset such as
    "the group's committed one" that nothing has replaced)."""
    if not tasks:
        return ["offsets: -"]

    def shown(key: TopicPartitionKey) -> str:
        offset = offsets.get(key)
        return "?" if offset is None else "-" if offset < 0 else str(offset)

    return ["offsets:"] + [
        f"  {task} (sub-topology {topology.subtopology(task).index}): " + ", ".join(
            f"{t}[{p}]={shown((t, p))}" for t, p in topology.task_partitions(task))
        for task in tasks]


def dump_report(app_id: str, datadir: str, slots: Iterable[ChildSlot],
                offsets: Mapping[TopicPartitionKey, int], topology: Topology,
                kinds: Optional[Mapping[str, str]] = None) -> str:
    """Gathers the report (the supervisor's threads; the sub-topologies, with ``kinds``
    naming repartition topics (:func:`supervisor.subtopologies.topic_kinds`); per child
    its state, tasks, the ``offsets`` it reported per task and its threads), writes it
    under ``datadir`` (one file per dump plus ``dump-latest.txt``) and returns it."""
    slots = list(slots)
    starts = {s.trace_path: _size(s.trace_path) for s in slots if s.pid is not None and s.trace_path}
    for slot in slots:
        if slot.pid is not None:
            slot.signal(signal.SIGUSR1)
    supervisor_threads = own_threads()
    traces = _read_growth(starts) if starts else {}
    lines = [f"shardsup traceback report — app {app_id}, supervisor pid {os.getpid()}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}", "", "sub-topologies:",
             *subtopology_lines(topology, kinds or {}), "",
             f"== supervisor (pid {os.getpid()}) ==", supervisor_threads]
    for slot in sorted(slots, key=lambda s: s.index):
        lines += ["", f"== child {slot.index} (pid {slot.pid}, state {slot.state}) ==",
                  f"tasks: {','.join(slot.tasks) or '-'}",
                  *task_offset_lines(slot.tasks, offsets, topology),
                  traces.get(slot.trace_path, "(not running)") if slot.pid else "(not running)"]
    report = "\n".join(lines) + "\n"
    folder = os.path.join(datadir, "dumps")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    name = os.path.join(folder, f"dump-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}.txt")
    write_new(name, report)
    tmp = latest_dump_path(datadir) + ".tmp"
    write_new(tmp, report)
    os.replace(tmp, latest_dump_path(datadir))  # replaces a link, never follows it
    return report
