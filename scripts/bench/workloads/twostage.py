"""The two-stage workload (``twostage-cN``): the stateful workload's input, re-keyed with
``stream.group_by`` through a repartition topic, then counted and summed per new key
(``bench/apps/twostage.py``), at least once with shardsup -c N.  Measured as the one-stage
count (``state-cN``, workloads/stateful.py) is, so the two rates compare: timing from the
tables' changelog records, exactness from the changelogs and from LMDB.  See
docs/benchmark.md ("The two-stage workload")."""
from __future__ import annotations

import argparse
import subprocess
import time
from typing import Any, Dict, List, Tuple

from confluent_kafka import Consumer

from ..kafkaio import committed_offsets, read_changelog
from .stateful import StateRun

#: ``group_by(..., name=...)`` in bench/apps/twostage.py
REPARTITION_NAME = "by-group"


def twostage_truth(n: int, keys: int) -> Tuple[Dict[str, int], Dict[str, int]]:
    """The exact counts and sums per new key (``g<(i // 7) % keys>``) of the N input
    records ``{"n": i, "amount": i % 7}``: bench/apps/twostage.py's ``group_of``."""
    counts: Dict[str, int] = {}
    sums: Dict[str, int] = {}
    for i in range(n):
        key = "g%d" % (i // 7 % keys)
        counts[key] = counts.get(key, 0) + 1
        sums[key] = sums.get(key, 0) + i % 7
    return counts, sums


class TwoStageRun(StateRun):
    """``twostage-cN``: shardsup -c N, at-least-once.  Stage 1 (the input's tasks) forwards
    every record to the repartition topic keyed by its new key; stage 2 (the repartition
    topic's tasks) runs the agent's loop and writes the tables, so the tables' changelog
    records carry the repartition topic's offsets: one repartition record per input record,
    so the changelog's progress curve counts input records processed end to end."""

    APP = "bench.apps.twostage"

    def __init__(self, kind: str, args: argparse.Namespace, bootstrap: str, broker_pid: int,
                 workdir: str) -> None:
        super().__init__(kind, args, bootstrap, broker_pid, workdir,
                         twostage_truth(args.records, args.keys))
        self.repartition_topic = f"{self.prefix}-{REPARTITION_NAME}-repartition"

    def wait_processed(self, watcher: Consumer, proc: subprocess.Popen, ends: Dict[int, int],
                       samples: List[Tuple[float, int]]) -> bool:
        """Waits until the input's committed offsets reach its end offsets (every record
        forwarded and acknowledged: DESIGN.md, "Sub-topologies", "Re-keying") and the
        repartition topic's committed offsets add up to N (every forwarded record
        processed by stage 2 and its state committed).  ``samples``: ``(time, repartition
        records committed)``.  A forward sent twice (at least once, after a failure) would
        count twice here: the exactness check after the run would then say so."""
        n, parts = self.args.records, self.args.partitions
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline and proc.poll() is None:
            downstream = sum(committed_offsets(watcher, self.repartition_topic, parts).values())
            samples.append((time.time(), downstream))
            if downstream >= n:
                got = committed_offsets(watcher, self.in_topic, parts)
                if all(got.get(p, 0) >= ends.get(p, 0) for p in range(parts)):
                    self.result["repartition_committed"] = downstream
                    if downstream > n:
                        self.result["note"] += (f"the repartition topic holds {downstream} "
                                                f"records for {n} inputs (forwards sent again); ")
                    return True
            time.sleep(0.25)
        return False

    def execute(self) -> Dict[str, Any]:
        res = super().execute()
        res["repartition_topic"] = self.repartition_topic
        if res.get("curve_end") is not None:
            self.measure_from_first_forward()
        return res

    def measure_from_first_forward(self) -> None:
        """``from_forward_rate``: input records / (stage 1's first forward → the last
        changelog record), a cross-check of the steady rate, which starts at stage 2's
        first changelog record and so leaves out what stage 1 did before it.  Also
        counts the repartition topic's records (one per input record unless a forward was
        sent twice)."""
        res, n = self.result, self.args.records
        try:
            rows = read_changelog(self.bootstrap, self.repartition_topic, 60.0)
        except Exception as exc:  # noqa: BLE001 - a cross-check only: noted
            res["note"] += f"repartition topic not read: {type(exc).__name__}: {exc}; "
            return
        res["repartition_records"] = len(rows)
        if len(rows) != n:
            res["note"] += f"the repartition topic holds {len(rows)} records for {n} inputs; "
        if rows and res.get("span_s"):
            first_forward = min(r[1] for r in rows) / 1000.0
            last_changelog = res["first_changelog_at"] + res["span_s"]
            if last_changelog > first_forward:
                res["from_forward_s"] = last_changelog - first_forward
                res["from_forward_rate"] = n / res["from_forward_s"]
