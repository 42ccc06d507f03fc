"""The raw loops: one process each, a plain confluent-kafka Consumer ``assign()``-ed to all
input partitions from the beginning, no framework.  ``raw`` (stateless: consume → loads →
work → dumps → produce, flush at the end) and ``state-raw`` (consume → loads → two dicts).
Run by the benchmark as ``python -m bench --raw-child|--state-raw-child`` in scripts/."""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict, List, Optional, Tuple

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from shardworker.app import DEFAULT_SETTINGS, FETCH_QUEUE_BACKOFF_MS

from ..measure import compare, state_truth
from ..work import linger_setting, timed_result

#: the producer settings shardsup's children use (shardworker/app.py producer_config)
RAW_PRODUCER = {"linger.ms": linger_setting().get("producer_linger_ms",
                                                  DEFAULT_SETTINGS["producer_linger_ms"]),
                "enable.idempotence": True, "partitioner": "murmur2_random",
                "log.connection.close": False}


# -- the raw loop (run as a subprocess by the benchmark) ---------------------------------------
def raw_child(args: argparse.Namespace) -> int:
    """One process, no framework: consume → loads → work → dumps → produce; flush at the end.
    Prints its own timing as one JSON line on stdout."""
    in_topic, out_topic = f"{args.prefix}-in", f"{args.prefix}-out"
    errors: List[str] = []

    def on_error(err, msg) -> None:  # type: ignore[no-untyped-def]
        if err is not None:
            errors.append(err.str())

    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"{args.prefix}-raw",
                         "enable.auto.commit": False, "enable.auto.offset.store": False,
                         "auto.offset.reset": "earliest", "fetch.wait.max.ms": 100,
                         # the consumer settings shardsup's children use
                         "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
                         "log.connection.close": False})
    consumer.assign([TopicPartition(in_topic, p, OFFSET_BEGINNING) for p in range(args.partitions)])
    producer = Producer({"bootstrap.servers": args.bootstrap, **RAW_PRODUCER,
                         "delivery.report.only.error": True, "on_delivery": on_error})
    loads = json.loads
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    result = timed_result
    produce = producer.produce
    n = args.records
    seen = 0
    first: Optional[float] = None
    deadline = time.monotonic() + args.timeout
    while seen < n and time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.5):
            if msg.error() is not None:
                continue
            if first is None:
                first = time.time()
            data = dumps(result(loads(msg.value()))).encode()
            try:
                produce(out_topic, data, msg.key())
            except BufferError:
                producer.poll(0.05)
                produce(out_topic, data, msg.key())
            seen += 1
        producer.poll(0)
    last_produced = time.time()
    left = producer.flush(60)
    done = time.time()
    consumer.close()
    print(json.dumps({"records": seen, "first": first or done, "last_produced": last_produced,
                      "done": done, "unacked": left, "errors": errors[:3]}), flush=True)
    return 0 if seen == n and not left and not errors else 1


# -- the raw stateful loop (run as a subprocess by the benchmark) ------------------------------
def state_raw_child(args: argparse.Namespace) -> int:
    """One process, no framework: consume → loads → two dicts (count and sum per key).
    Prints its own timing (first record consumed → last record applied, and the records
    applied after each consume() call) and whether its dicts are exact, as one JSON line."""
    from collections import defaultdict

    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"{args.prefix}-raw",
                         "enable.auto.commit": False, "enable.auto.offset.store": False,
                         "auto.offset.reset": "earliest", "fetch.wait.max.ms": 100,
                         # the consumer settings shardsup's children use
                         "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
                         "log.connection.close": False})
    consumer.assign([TopicPartition(f"{args.prefix}-in", p, OFFSET_BEGINNING)
                     for p in range(args.partitions)])
    counts: Dict[str, int] = defaultdict(int)
    sums: Dict[str, int] = defaultdict(int)
    loads = json.loads
    n = args.records
    seen = 0
    first: Optional[float] = None
    points: List[Tuple[float, int]] = []
    deadline = time.monotonic() + args.timeout
    while seen < n and time.monotonic() < deadline:
        # consume() returns early only with 1000 records: near the end it waits out its
        # timeout, so this is the timeout shardsup's children use (shardworker/worker.py)
        msgs = consumer.consume(1000, 0.1)
        if not msgs:
            continue
        if first is None:
            first = time.time()
        for msg in msgs:
            if msg.error() is not None:
                continue
            key = msg.key().decode()
            value = loads(msg.value())
            counts[key] += 1
            sums[key] += value["amount"]
            seen += 1
        points.append((time.time(), seen))
    consumer.close()
    want_counts, want_sums = state_truth(n, args.keys)
    mismatch = "; ".join(f"{name}: {diff}" for name, diff in
                         (("counts", compare(dict(counts), want_counts)),
                          ("sums", compare(dict(sums), want_sums))) if diff)
    last = points[-1][0] if points else time.time()
    print(json.dumps({"records": seen, "first": first or last, "last": last, "points": points,
                      "mismatch": mismatch}), flush=True)
    return 0 if seen == n and not mismatch else 1

