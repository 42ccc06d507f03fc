"""The per-record work every system does in the stateless workload, and its timing.

Standard library only: the shardsup app (``scripts/bench_app.py``), the raw loop and the
peers' processes (another virtualenv) all import it, so they run the same code.

    BENCH_WORK_ITERS   iterations of :func:`work`, calibrated by the benchmark to ~20 µs a
                       record (``measure.calibrate``)
    BENCH_STATS_DIR    where a process that processed records writes how long its
                       :func:`timed_result` calls took and its own CPU time
                       (``stats-<pid>.json``, at exit or when :func:`write_stats` is called)
    BENCH_LINGER_MS    ``scripts/bench --linger-ms``: the producers' linger in shardsup's
                       benchmark apps and the raw loops (:func:`linger_setting`)
"""
import atexit
import json
import os
import time
from typing import Any, Dict, Optional

WORK_ITERS = int(os.environ.get("BENCH_WORK_ITERS", "200"))
LINGER_ENV = "BENCH_LINGER_MS"


def linger_setting() -> Dict[str, int]:
    """``{"producer_linger_ms": ms}`` for a benchmark App when ``--linger-ms`` set it;
    empty (the App's default) when not."""
    value = os.environ.get(LINGER_ENV)
    return {"producer_linger_ms": int(value)} if value else {}


def work(seed: int, iters: int = WORK_ITERS) -> int:
    """Pure-Python busy work: a small hash chain of ``iters`` steps (no sleeping, no C)."""
    acc = seed
    for j in range(iters):
        acc = (acc * 31 + j) & 0xFFFFFFFF
    return acc


def result(value: dict, iters: int = WORK_ITERS) -> dict:
    """One input record's output: the work, and a small JSON-able dict."""
    return {"i": value["i"], "user": value["user"], "h": work(value["i"], iters)}


#: [seconds spent in result(), records] in this process
STATS = [0.0, 0]
#: whether write_stats() was called (a peer writes its stats when done: not again at exit)
WRITTEN = [False]


def timed_result(value: dict, _clock=time.perf_counter, _stats=STATS) -> dict:
    """:func:`result`, timed, so the benchmark can tell the work from everything around it
    even when the machine's speed drifts (the two clock reads cost ~0.1 µs)."""
    t0 = _clock()
    out = result(value)
    _stats[0] += _clock() - t0
    _stats[1] += 1
    return out


def write_stats(extra: Optional[Dict[str, Any]] = None, name: str = "stats") -> None:
    """Writes ``<name>-<pid>.json`` to BENCH_STATS_DIR: the work's time and records, this
    process's CPU seconds, and ``extra`` (a peer's own clock, its final state)."""
    where = os.environ.get("BENCH_STATS_DIR")
    if not where:
        return
    WRITTEN[0] = True
    t = os.times()
    data = {"pid": os.getpid(), "work_s": STATS[0], "records": STATS[1],
            "cpu_s": t.user + t.system, **(extra or {})}
    path = os.path.join(where, f"{name}-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)  # the benchmark polls for the file: never half-written


@atexit.register
def _write_stats_at_exit() -> None:
    if STATS[1] and not WRITTEN[0]:
        write_stats()
