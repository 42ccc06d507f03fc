"""The app ``scripts/bench.py`` measures, and the per-record work it shares with the raw loop.

Run by the benchmark as ``shardsup start -A bench_app`` with ``scripts/`` as the current
directory.  Its topic names and app id come from the environment, so every measured run
uses fresh topics and a fresh consumer group:

    BENCH_PREFIX       app id and topic prefix (topics ``<prefix>-in`` and ``<prefix>-out``)
    BENCH_PARTITIONS   partitions of both topics (8)
    BENCH_WORK_ITERS   iterations of :func:`work`, calibrated by bench.py to ~20 µs a record
    BENCH_STATS_DIR    where each process that processed records writes, at exit, how long
                       its :func:`result` calls took and its own CPU time (stats-<pid>.json)

:func:`work` and :func:`result` are exactly what the raw confluent-kafka loop in bench.py
runs per record, so the two measurements differ only in what is around them.
"""
import atexit
import json
import os
import time

import shardworker

P = os.environ.get("BENCH_PREFIX", "bench")
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "8"))
WORK_ITERS = int(os.environ.get("BENCH_WORK_ITERS", "200"))


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


def timed_result(value: dict, _clock=time.perf_counter, _stats=STATS) -> dict:
    """:func:`result`, timed, so the benchmark can tell the work from everything around it
    even when the machine's speed drifts (the two clock reads cost ~0.1 µs)."""
    t0 = _clock()
    out = result(value)
    _stats[0] += _clock() - t0
    _stats[1] += 1
    return out


@atexit.register
def _write_stats() -> None:
    where = os.environ.get("BENCH_STATS_DIR")
    if not where or not STATS[1]:
        return
    t = os.times()
    with open(os.path.join(where, f"stats-{os.getpid()}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "work_s": STATS[0], "records": STATS[1],
                   "cpu_s": t.user + t.system}, f)


# session_timeout_ms: the test broker (tansu) delays a group's first join by about half the
# session timeout, so a short one keeps the start-up short; commit_interval as the default.
app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000)
source = app.topic(f"{P}-in", partitions=PARTITIONS, value_serializer="json")
sink = app.topic(f"{P}-out", partitions=PARTITIONS, value_serializer="json")


@app.agent(source, sink=[sink])
async def process(stream):
    async for value in stream:
        yield timed_result(value)
