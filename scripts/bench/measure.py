"""Measurement helpers shared by the workloads: the work's calibration, CPU accounting, the
stateful truth, progress curves and rates, report formatting, the code measured."""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

from . import work as bench_work

#: scripts/ (the current directory of every process the benchmark starts) and the repo root
SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(SCRIPTS)


# -- work calibration -------------------------------------------------------------------
def calibrate(target_us: float) -> Dict[str, float]:
    """Picks ``work`` iterations so that one record's ``result()`` (what every run calls per
    record) costs ``target_us`` µs in this process; returns the iterations and the cost."""
    values = [{"i": i, "user": f"u{i % 1000}", "amount": i % 97 + 0.5} for i in range(1000)]

    def per_record(iters: int) -> float:
        # the median of many short samples: a VM's speed drifts, and the best sample is
        # a burst the runs will not see
        samples = []
        for _trial in range(15):
            t0 = time.perf_counter()
            for v in values:
                bench_work.result(v, iters)
            samples.append((time.perf_counter() - t0) / len(values))
        return statistics.median(samples) * 1e6

    iters = 200
    for _ in range(6):  # converges: the fixed part (dict, call) is small
        iters = max(1, round(iters * target_us / per_record(iters)))
    return {"iters": iters, "us": per_record(iters)}


def tree_cpu(pid: int) -> float:
    """user+sys CPU seconds of a live process (for the broker)."""
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:  # noqa: BLE001 - informational only
        return float("nan")


def machine_cpu() -> Tuple[float, float]:
    """(busy, steal): CPU seconds the whole machine has been busy (all processes), and
    seconds the hypervisor ran something else instead of this VM, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    fields += [0] * (8 - len(fields))
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle - fields[7]) / tick, fields[7] / tick


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


STATE_TABLES = ("counts", "sums")
#: shardworker/restore.py's line after a task's restore
RESTORED_RE = re.compile(r"task (\S+): restored (\d+) changelog records \((\d+) skipped[^)]*\) "
                         r"in ([0-9.]+)s")
#: a changelog record as bench.py keeps it: (timestamp kind, timestamp ms, key, value,
#: source partition, source offset) -- the last two from the changelog headers
ChangelogRow = Tuple[int, int, bytes, Optional[bytes], Optional[int], Optional[int]]


def is_state_kind(kind: str) -> bool:
    """A run of the stateful workloads: ``state-*`` and the two-stage ``twostage-cN``."""
    return kind.startswith(("state-", "twostage-"))


def state_truth(n: int, keys: int) -> Tuple[Dict[str, int], Dict[str, int]]:
    """The exact counts and sums per key of the N stateful input records."""
    counts: Dict[str, int] = {}
    sums: Dict[str, int] = {}
    for i in range(n):
        key = f"u{i % keys}"
        counts[key] = counts.get(key, 0) + 1
        sums[key] = sums.get(key, 0) + i % 7
    return counts, sums


def compare(got: Dict[str, Any], want: Dict[str, int]) -> str:
    """'' when ``got`` equals ``want``, else what differs, in one line."""
    if got == want:
        return ""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]]
    return (f"{len(missing)} keys missing, {len(extra)} unexpected, {len(wrong)} wrong "
            f"(key, got, want: {wrong[:3]})")


def progress_curve(rows: List[ChangelogRow]) -> List[Tuple[float, int]]:
    """``(time s, input records processed by then)`` from changelog records: each carries
    its batch's last input offset per source partition (header) and the CreateTime the
    child's producer gave it when the batch was drained (after the agent processed it)."""
    done: Dict[int, int] = {}
    total = 0
    points: List[Tuple[float, int]] = []
    for ts, p, o in sorted((r[1], r[4], r[5]) for r in rows if r[4] is not None and r[5] is not None):
        if o + 1 > done.get(p, 0):
            total += o + 1 - done.get(p, 0)
            done[p] = o + 1
        t = ts / 1000.0
        if points and points[-1][0] == t:
            points[-1] = (t, total)
        else:
            points.append((t, total))
    return points


def curve_rates(points: List[Tuple[float, int]], n: int) -> Dict[str, Any]:
    """steady rate between the first and last point, the middle 80% rate (10% → 90% of N
    processed), and the longest pause between consecutive points."""
    out: Dict[str, Any] = {}
    if len(points) < 2:
        return out
    (t0, c0), (t1, c1) = points[0], points[-1]
    out["span_s"] = t1 - t0
    out["curve_end"] = c1
    out["first_batch"] = c0
    if t1 > t0:
        out["rate"] = (c1 - c0) / (t1 - t0)
    lo = next((pt for pt in points if pt[1] >= 0.1 * n), None)
    hi = next((pt for pt in points if pt[1] >= 0.9 * n), None)
    if lo and hi and hi[0] > lo[0]:
        out["mid_rate"] = (hi[1] - lo[1]) / (hi[0] - lo[0])
    gap, at = max(((b[0] - a[0], a[1]) for a, b in zip(points, points[1:])), default=(0.0, 0))
    out["pause_s"], out["pause_at"] = gap, at
    return out


def parse_restored(log_path: str) -> Dict[str, Tuple[int, int, float]]:
    """``{task: (applied, skipped, seconds)}`` from the restore lines of a JSON log."""
    found: Dict[str, Tuple[int, int, float]] = {}
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    msg = json.loads(line).get("msg", "")
                except ValueError:
                    msg = line
                m = RESTORED_RE.search(msg)
                if m:
                    found[m.group(1)] = (int(m.group(2)), int(m.group(3)), float(m.group(4)))
    except FileNotFoundError:
        pass
    return found


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def median_of(results: Dict[str, List[Dict[str, Any]]], kind: str, key: str) -> Optional[float]:
    """The median of ``key`` over the complete runs of ``kind`` (None when there are none)."""
    vals = [r[key] for r in results.get(kind, []) if r.get("ok") and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def code_state() -> str:
    """The commit measured, and the files of shardworker/ and supervisor/ that differ from
    it (a benchmark of a work tree in flux should say so)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "shardworker", "supervisor"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {head or '?'}" + (f", uncommitted changes in {', '.join(changed)}" if changed
                                      else ", no uncommitted changes in shardworker/ or supervisor/")

