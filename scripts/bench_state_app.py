"""The stateful app the benchmark (``scripts/bench/``) measures (``--workload stateful``): count and sum per
key in two tables, nothing else (no sink, no extra work per record).

Run by the benchmark as ``shardsup start -A bench_state_app`` with ``scripts/`` as the
current directory (and as ``shardsup table -A bench_state_app`` to read the tables back).
Its app id and topic names come from the environment, so every measured run uses a fresh
input topic, fresh changelog topics and a fresh consumer group:

    BENCH_PREFIX       app id (= consumer group) and topic prefix: input ``<prefix>-in``,
                       changelogs ``<prefix>-counts-changelog``, ``<prefix>-sums-changelog``
    BENCH_PARTITIONS   partitions of the input topic (8)
    BENCH_GUARANTEE    the App's processing_guarantee: at_least_once (default) or
                       exactly_once
    BENCH_STATS_DIR    where each child process writes its own CPU time at exit
                       (stats-<pid>.json); the supervisor, which imports this module too,
                       writes nothing
    BENCH_PROFILE      when set (``--profile``), each child runs under cProfile and
                       writes profile-<pid>.prof to BENCH_STATS_DIR at exit
    BENCH_LINGER_MS    ``--linger-ms``: the App's producer_linger_ms (bench/work.py)

The input records are keyed ``u<n % 1000>`` (key serializer ``str``) with JSON values
``{"n": n, "amount": n % 7}``, produced with Java Kafka's partitioner (librdkafka's
``murmur2_random``, no explicit partition): a table key must belong to the partition of the
task that writes it.  The raw-loop baseline (bench/systems/raw.py) does the same work with two dicts.
"""
import atexit
import json
import os

import shardworker
from bench.work import linger_setting

P = os.environ.get("BENCH_PREFIX", "bench-state")
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "8"))
GUARANTEE = os.environ.get("BENCH_GUARANTEE", "at_least_once")
#: set in shardsup's child processes only (supervisor/children.py CHILD_TOKEN_ENV)
IS_CHILD = bool(os.environ.get("SHARDSUP_CHILD_TOKEN"))

_PROFILER = None
if IS_CHILD and os.environ.get("BENCH_PROFILE") and os.environ.get("BENCH_STATS_DIR"):
    import cProfile

    _PROFILER = cProfile.Profile()
    _PROFILER.enable()


@atexit.register
def _write_stats() -> None:
    where = os.environ.get("BENCH_STATS_DIR")
    if not where or not IS_CHILD:
        return
    if _PROFILER is not None:
        _PROFILER.disable()
        _PROFILER.dump_stats(os.path.join(where, f"profile-{os.getpid()}.prof"))
    t = os.times()
    with open(os.path.join(where, f"stats-{os.getpid()}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "cpu_s": t.user + t.system}, f)


# session_timeout_ms: the test broker (tansu) delays a group's first join by about half the
# session timeout, so a short one keeps the start-up short (as in bench_app); the other
# settings are the defaults (batch_size 1000, commit_interval 1.0 s).
app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      processing_guarantee=GUARANTEE, **linger_setting())
source = app.topic(f"{P}-in", partitions=PARTITIONS, key_serializer="str",
                   value_serializer="json")
counts = app.table("counts", default=int)
sums = app.table("sums", default=int)


@app.agent(source)
async def count(stream):
    async for key, value in stream.items():
        counts[key] += 1
        sums[key] += value["amount"]
