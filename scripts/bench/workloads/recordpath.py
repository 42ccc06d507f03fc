"""The whole record path of a child inside one process, without Kafka: what the worker
costs per record from a consumed batch to the tables' drain.

Run from the repository root::

    .venv/bin/python -m scripts.bench.workloads.recordpath            # 200,000 records
    .venv/bin/python -m scripts.bench.workloads.recordpath --profile

The records are those of the stateful workload (JSON ``{"n", "amount"}``, keys ``u<n %
1000>`` on their Java-partitioner partition of 8), made as real ``confluent_kafka.Message``
objects, so the worker calls the same C methods as in a child.  Two loops in this
process, each timed by CPU time (``process_time``), best of ``--repeat``:

* the baseline: the raw loop's work (systems/raw.py): decode the key, ``json.loads`` the
  value, two dicts;
* shardsup: the benchmark app's count agent (``scripts/bench_state_app.py``, two tables)
  run by the worker (``Worker.process_chunk`` per batch of 1,000: decode, the agent's
  stream, the tables, a batch's bookkeeping) on the agent test driver's edges (a producer
  that acknowledges on flush, LMDB stores in a temporary directory), drained every
  ``--drain-every`` batches as the at-least-once worker does every ``commit_interval``.

The ratio (baseline CPU / shardsup CPU) is the figure; consuming, producing and the
broker are not in it (the end-to-end workloads measure those).  For counts that do not
move with the machine's load, run it under ``valgrind --tool=callgrind`` with two record
counts and divide the difference in instructions (docs/benchmark.md, "The record path in
one process").
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

from confluent_kafka import Message

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
for where in (ROOT, os.path.join(ROOT, "scripts")):
    if where not in sys.path:
        sys.path.insert(0, where)

import bench_state_app  # noqa: E402
from shardworker.agentdriver import AgentDriver  # noqa: E402
from shardworker.partitioner import partition_for  # noqa: E402

from .inprocess import baseline  # noqa: E402  (the raw loop's work, on any messages)

KEYS, BATCH = 1000, 1000


def make_records(n: int, topic: str, partitions: int) -> List[Message]:
    offsets = [0] * partitions
    records = []
    for i in range(n):
        key = f"u{i % KEYS}".encode()
        p = partition_for(key, partitions)
        records.append(Message(topic=topic, partition=p, offset=offsets[p], key=key,
                               value=json.dumps({"n": i, "amount": i % 7}).encode(),
                               timestamp=(1, 1_700_000_000_000 + i)))
        offsets[p] += 1
    return records


def shardsup(records: List[Message], drain_every: int, profile: bool = False) -> float:
    """CPU seconds of the worker over ``records``; checks the tables' counts after."""
    driver = AgentDriver(bench_state_app.count)
    driver._datadir = tempfile.mkdtemp(prefix="shardsup-recordpath-")
    try:
        driver._setup()
        worker = driver.worker
        assert worker is not None
        worker.committer.drains_every_chunk = False  # type: ignore[misc]
        worker.drain_interval = float("inf")  # drained below, every drain_every batches
        # the driver's own note of the last record taken (for its tests): a child's
        # at-least-once stream has no per-record hook
        worker.runners[0].stream.on_record = None
        for p in range(bench_state_app.PARTITIONS):
            driver._open_task(bench_state_app.source.name, p)
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        began = time.process_time()
        for number, start in enumerate(range(0, len(records), BATCH), 1):
            worker.process_chunk(records[start:start + BATCH])  # type: ignore[arg-type]
            if number % drain_every == 0:
                worker.drain()
            worker.settle(block=False)
        worker.drain()
        worker.settle(block=True)
        elapsed = time.process_time() - began
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        _check(driver, records)
        return elapsed
    finally:
        driver._teardown()
        shutil.rmtree(driver._datadir, ignore_errors=True)


def _check(driver: AgentDriver, records: List[Message]) -> None:
    """Every key's count in LMDB is the number of its records (the run did the work)."""
    expected: Dict[bytes, int] = {}
    for msg in records:
        expected[msg.key()] = expected.get(msg.key(), 0) + 1
    state = driver.worker.state  # type: ignore[union-attr]
    stored = {}
    for task in state.tasks.values():
        for kb, raw in task.store.items("counts"):
            stored[kb] = int(raw)
    wanted = {json.dumps(k.decode()).encode(): n for k, n in expected.items()}
    assert stored == wanted, f"{len(stored)} keys stored, {len(wanted)} expected"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--drain-every", type=int, default=50,
                        help="batches of 1,000 records between drains")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--made", type=int, default=0,
                        help="records made beforehand, of which the first --records are "
                             "processed (instruction counts: the same in both runs)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="only shardsup's loop (instruction counts)")
    args = parser.parse_args(argv)
    n = args.records
    records = make_records(max(n, args.made), bench_state_app.source.name,
                           bench_state_app.PARTITIONS)[:n]
    cpu = min(shardsup(records, args.drain_every) for _ in range(args.repeat))
    if args.no_baseline:
        print(f"worker + agent: {cpu / n * 1e6:.2f} µs/rec (CPU time)")
        return 0
    base = min(baseline(records) for _ in range(args.repeat))
    print(f"in-process record path (count agent, two tables), {n:,} records, 1,000 keys, "
          f"{bench_state_app.PARTITIONS} tasks, drained every {args.drain_every} batch(es) "
          f"of {BATCH:,}; CPU time, best of {args.repeat}:")
    print(f"  raw loop's work  {n / base:>11,.0f} rec/s  {base / n * 1e6:6.2f} µs/rec")
    print(f"  worker + agent   {n / cpu:>11,.0f} rec/s  {cpu / n * 1e6:6.2f} µs/rec")
    print(f"  ratio {base / cpu:.2f} of the raw loop's work; +{(cpu - base) / n * 1e6:.2f} µs/rec")
    if args.profile:
        shardsup(records, args.drain_every, profile=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
