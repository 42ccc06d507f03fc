"""The app the benchmark (``scripts/bench/``) measures in the stateless workload.

Run by the benchmark as ``shardsup start -A bench_app`` with ``scripts/`` as the current
directory.  Its topic names and app id come from the environment, so every measured run
uses fresh topics and a fresh consumer group:

    BENCH_PREFIX       app id and topic prefix (topics ``<prefix>-in`` and ``<prefix>-out``)
    BENCH_PARTITIONS   partitions of both topics (8)
    BENCH_WORK_ITERS   iterations of ``work``, calibrated by the benchmark to ~20 µs a record
    BENCH_STATS_DIR    where each process that processed records writes, at exit, how long
                       its ``timed_result`` calls took and its own CPU time (stats-<pid>.json)

``work``, ``result`` and ``timed_result`` live in ``bench/work.py``: exactly what the raw
confluent-kafka loop and the peers run per record, so the measurements differ only in what
is around them.
"""
import os

import shardworker
from bench.work import (STATS, WORK_ITERS, linger_setting, result, timed_result,  # noqa: F401
                        work)

P = os.environ.get("BENCH_PREFIX", "bench")
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "8"))

# session_timeout_ms: the test broker (tansu) delays a group's first join by about half the
# session timeout, so a short one keeps the start-up short; commit_interval as the default.
app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      **linger_setting())
source = app.topic(f"{P}-in", partitions=PARTITIONS, value_serializer="json")
sink = app.topic(f"{P}-out", partitions=PARTITIONS, value_serializer="json")


@app.agent(source, sink=[sink])
async def process(stream):
    async for value in stream:
        yield timed_result(value)
