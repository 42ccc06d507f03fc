"""The two-stage app the benchmark measures (``twostage-cN``): the stateful workload's input
re-keyed by a field of the value with ``stream.group_by`` (stage 1: through the internal
topic ``<prefix>-by-group-repartition``), then count and sum per new key in two tables
(stage 2), as ``scripts/bench_state_app.py`` does per input key in one stage.  DESIGN.md,
"Sub-topologies".

Run by the benchmark as ``shardsup start -A bench.apps.twostage`` with ``scripts/`` as the
current directory (``shardsup table -A bench.apps.twostage`` reads the tables back).  The
graph is read from this file's source when the app starts, so the ``group_by`` name is a
literal.  Environment:

    BENCH_PREFIX       app id (= consumer group) and topic prefix: input ``<prefix>-in``,
                       repartition ``<prefix>-by-group-repartition``, changelogs
                       ``<prefix>-counts-changelog``, ``<prefix>-sums-changelog``
    BENCH_PARTITIONS   partitions of the input topic (8); the repartition topic gets as many
    BENCH_KEYS         how many new keys (the benchmark's --keys, 1000)
    BENCH_GUARANTEE    the App's processing_guarantee (at_least_once by default)
    BENCH_STATS_DIR    where each child process writes its own CPU time at exit

The input records are keyed ``u<n % keys>`` with JSON values ``{"n": n, "amount": n % 7}``
(``bench.kafkaio.preproduce_keyed``); the new key is ``g<(n // 7) % keys>``: as many keys as
the input's, but each input key's records spread over many new keys and every record
crosses to another partition (the new key's), so all of them go through the repartition
topic.  ``bench.workloads.twostage.twostage_truth`` is the same mapping.
"""
import atexit
import json
import os

import shardworker

P = os.environ.get("BENCH_PREFIX", "bench-twostage")
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "8"))
KEYS = int(os.environ.get("BENCH_KEYS", "1000"))
GUARANTEE = os.environ.get("BENCH_GUARANTEE", "at_least_once")
#: set in shardsup's child processes only (supervisor/children.py CHILD_TOKEN_ENV)
IS_CHILD = bool(os.environ.get("SHARDSUP_CHILD_TOKEN"))


@atexit.register
def _write_stats() -> None:
    where = os.environ.get("BENCH_STATS_DIR")
    if not where or not IS_CHILD:
        return
    t = os.times()
    with open(os.path.join(where, f"stats-{os.getpid()}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "cpu_s": t.user + t.system}, f)


# the same settings as bench_state_app (session_timeout_ms: a short start-up on tansu)
app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      processing_guarantee=GUARANTEE)
source = app.topic(f"{P}-in", partitions=PARTITIONS, key_serializer="str",
                   value_serializer="json")
counts = app.table("counts", default=int)
sums = app.table("sums", default=int)


def group_of(value):
    """The new key: runs where the input record was read (stage 1), so no tables here."""
    return "g%d" % (value["n"] // 7 % KEYS)


@app.agent(source)
async def count(stream):
    async for key, value in stream.group_by(group_of, name="by-group").items():
        counts[key] += 1
        sums[key] += value["amount"]
