"""The table path inside one process, without Kafka: what shardsup's tables cost per record.

Run from the repository root::

    .venv/bin/python -m scripts.bench.workloads.inprocess                 # 200,000 records
    .venv/bin/python -m scripts.bench.workloads.inprocess --drain-every 1 --profile

The same records (JSON ``{"n", "amount"}``, 1,000 keys, 8 partitions, as the stateful
workload) go through two loops in this process, each timed by CPU time (``process_time``,
so other processes on the machine do not move the figures), best of ``--repeat``:

* the baseline: ``json.loads`` and two dicts (``counts[key] += 1``, ``sums[key] +=
  amount``);
* shardsup's path: per record the worker's ``TableContext.set_message`` and the same two
  updates on two ``Table`` objects (``default=int``, ``str`` keys) over eight real
  ``TaskTables`` with LMDB stores; every ``--drain-every`` batches of 1,000 records each
  task is drained (changelog records to a producer that acknowledges at once) and its
  batch committed to LMDB.  The worker drains every ``commit_interval`` at least once (1 s:
  tens of batches at these rates) and after every chunk exactly-once (``--drain-every 1``).

The ratio (baseline CPU / shardsup CPU) is the figure; ``--profile`` prints the top
functions of one shardsup pass.  Consuming, producing and the broker are not in it: the
end-to-end workloads measure those.
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
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from shardworker.changelog import produce_batch  # noqa: E402
from shardworker.localkafka import LocalMessage  # noqa: E402
from shardworker.store import TaskStore  # noqa: E402
from shardworker.tables import Table  # noqa: E402
from shardworker.tablecontext import CONTEXT  # noqa: E402
from shardworker.tasktables import TaskTables  # noqa: E402

PARTITIONS, KEYS, BATCH = 8, 1000, 1000


class Delivered:
    def __init__(self, topic: str, offset: int) -> None:
        self._topic, self._offset = topic, offset

    def topic(self) -> str:
        return self._topic

    def offset(self) -> int:
        return self._offset


class AckingProducer:
    """Acknowledges every record at once (its delivery report runs inside produce)."""

    def __init__(self) -> None:
        self.produced = 0

    def produce(self, topic: str, value: Any = None, key: Any = None, partition: int = -1,
                on_delivery: Optional[Callable[..., None]] = None, headers: Any = None) -> None:
        self.produced += 1
        if on_delivery is not None:
            on_delivery(None, Delivered(topic, self.produced))


def make_records(n: int) -> List[LocalMessage]:
    offsets = [0] * PARTITIONS
    records = []
    for i in range(n):
        p = i % PARTITIONS
        records.append(LocalMessage("in", p, offsets[p], f"u{i % KEYS}".encode(),
                                    json.dumps({"n": i, "amount": i % 7}).encode(), None,
                                    1_700_000_000_000 + i))
        offsets[p] += 1
    return records


def baseline(records: List[LocalMessage]) -> float:
    """CPU seconds of the raw loop's work over ``records`` (any objects with ``key()``
    and ``value()``: recordpath.py passes confluent_kafka messages)."""
    counts: Dict[str, int] = {}
    sums: Dict[str, int] = {}
    began = time.process_time()
    for msg in records:
        value = json.loads(msg.value())
        key = msg.key().decode()
        counts[key] = counts.get(key, 0) + 1
        sums[key] = sums.get(key, 0) + value["amount"]
    return time.process_time() - began


def shardsup(records: List[LocalMessage], drain_every: int, profile: bool = False) -> Tuple[float, int]:
    """CPU seconds of the table path over ``records``, and the changelog records written."""
    where = tempfile.mkdtemp(prefix="shardsup-inprocess-")
    counts = Table("counts", default=int, key_serializer="str", app_id="bench")
    sums = Table("sums", default=int, key_serializer="str", app_id="bench")
    tasks = {("in", p): TaskTables(TaskStore(os.path.join(where, str(p)), ["counts", "sums"],
                                             map_size=256 << 20, sync=False),
                                   [counts, sums], p, "in", None, task_id=f"0_{p}")
             for p in range(PARTITIONS)}
    producer, errors = AckingProducer(), []  # type: ignore[var-annotated]
    profiler = cProfile.Profile() if profile else None
    try:
        if profiler is not None:
            profiler.enable()
        began = time.process_time()
        pending: Dict[Tuple[str, int], int] = {}
        for start in range(0, len(records), BATCH):
            for msg in records[start:start + BATCH]:
                tp = (msg.topic(), msg.partition())
                CONTEXT.set_message(tasks[tp], msg)
                value = json.loads(msg.value())
                key = msg.key().decode()
                counts[key] += 1
                sums[key] += value["amount"]
                pending[tp] = msg.offset() + 1
            CONTEXT.clear()
            last = start + BATCH >= len(records)
            if (start // BATCH + 1) % drain_every and not last:
                continue
            drained = [tasks[tp].drain({tp: nxt}) for tp, nxt in pending.items()]
            for batch in drained:
                produce_batch(producer, batch, errors)  # type: ignore[arg-type]
            for batch in drained:
                batch.commit()
            pending = {}
        elapsed = time.process_time() - began
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        assert not errors, errors
        return elapsed, producer.produced
    finally:
        for task in tasks.values():
            task.close()
        shutil.rmtree(where, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--drain-every", type=int, default=50,
                        help="batches of 1,000 records between drains (1: exactly-once's rate)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    records = make_records(args.records)
    base = min(baseline(records) for _ in range(args.repeat))
    runs = [shardsup(records, args.drain_every) for _ in range(args.repeat)]
    cpu, changelog = min(runs)
    n = args.records
    print(f"in-process table path, {n:,} records, 1,000 keys, 8 tasks, drained every "
          f"{args.drain_every} batch(es) of {BATCH:,}; CPU time, best of {args.repeat}:")
    print(f"  dict loop   {n / base:>11,.0f} rec/s  {base / n * 1e6:6.2f} µs/rec")
    print(f"  tables      {n / cpu:>11,.0f} rec/s  {cpu / n * 1e6:6.2f} µs/rec  "
          f"({changelog:,} changelog records)")
    print(f"  ratio {base / cpu:.2f} of the dict loop; +{(cpu - base) / n * 1e6:.2f} µs/rec")
    if args.profile:
        shardsup(records, args.drain_every, profile=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
