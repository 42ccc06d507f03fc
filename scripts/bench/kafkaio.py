"""Kafka helpers: topics, pre-producing the input, reading outputs, changelogs and committed
offsets (confluent-kafka, the project's virtualenv)."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from shardworker.changelog import HDR_SRC_OFFSET, HDR_SRC_PARTITION
from shardworker.produce import produce

from .measure import ChangelogRow


# -- broker helpers -----------------------------------------------------------------------
def create_topics(bootstrap: str, names: List[str], partitions: int,
                  config: Optional[Dict[str, str]] = None) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, partitions, -1, config=config or {})
                                       for n in names]).values():
        future.result(15)
    deadline = time.monotonic() + 15
    while True:
        meta = admin.list_topics(timeout=5).topics
        if all(n in meta and len(meta[n].partitions) == partitions for n in names):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {names} did not appear")
        time.sleep(0.1)


def preproduce(bootstrap: str, topic: str, n: int, partitions: int) -> float:
    """Produces the N input records (round-robin over the partitions); returns seconds."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "enable.idempotence": True, "queue.buffering.max.messages": 500_000,
                         "batch.num.messages": 10_000})
    failures: List[str] = []

    def delivered(err, msg) -> None:  # type: ignore[no-untyped-def]
        if err is not None:
            failures.append(err.str())

    dumps = json.JSONEncoder(separators=(",", ":")).encode
    t0 = time.monotonic()
    for i in range(n):
        user = f"u{i % 1000}"
        value = dumps({"i": i, "user": user, "amount": i % 97 + 0.5}).encode()
        produce(producer, topic, value, user.encode(), on_delivery=delivered,
                partition=i % partitions)
        if i % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left or failures:
        raise RuntimeError(f"pre-producing failed: {left} unacknowledged, errors {failures[:3]}")
    return time.monotonic() - t0


def committed_total(consumer: Consumer, topic: str, partitions: int) -> int:
    """Sum of the committed input offsets of ``consumer``'s group (which it never joins).

    shardsup commits an input offset only after the record's outputs are acknowledged, so
    N committed means N results are in the output topic.  (The output topic's high
    watermarks would be the obvious signal, but tansu reports them wrongly: the last
    record batch's base offset + 1.)"""
    got = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=5)
    return sum(max(tp.offset, 0) for tp in got)


def read_outputs(bootstrap: str, topic: str, partitions: int, n: int, timeout: float,
                 first: Dict[int, int], state: Dict[str, Any], consumer: Optional[Consumer] = None
                 ) -> Consumer:
    """Reads the output topic (from where ``consumer`` is) until N distinct records or the
    timeout; ``first`` maps record number → earliest CreateTime (ms) seen for it."""
    if consumer is None:
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{uuid.uuid4().hex}",
                             "enable.auto.commit": False, "enable.partition.eof": False})
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    loads = json.loads
    deadline = time.monotonic() + timeout
    while len(first) < n and time.monotonic() < deadline:
        for msg in consumer.consume(10_000, 0.5):
            if msg.error() is not None:
                continue
            kind, ts = msg.timestamp()
            state["messages"] += 1
            state["ts_kinds"].add(kind)
            i = loads(msg.value())["i"]
            if i not in first or ts < first[i]:
                first[i] = ts
    return consumer


def preproduce_keyed(bootstrap: str, topic: str, n: int, keys: int
                     ) -> Tuple[float, Dict[int, int], str]:
    """Produces the N stateful input records: key ``u<i % keys>``, value ``{"n": i, "amount":
    i % 7}``, placed by Java Kafka's partitioner (murmur2_random, no explicit partition), as
    tables require.  Returns (seconds, {partition: end offset from the delivery reports},
    a note when the offsets are not dense)."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                         "linger.ms": 20, "enable.idempotence": True,
                         "queue.buffering.max.messages": 500_000, "batch.num.messages": 10_000})
    failures: List[str] = []
    ends: Dict[int, int] = {}
    per_partition: Dict[int, int] = {}

    def delivered(err, msg) -> None:  # type: ignore[no-untyped-def]
        if err is not None:
            failures.append(err.str())
            return
        p = msg.partition()
        per_partition[p] = per_partition.get(p, 0) + 1
        if msg.offset() + 1 > ends.get(p, 0):
            ends[p] = msg.offset() + 1

    dumps = json.JSONEncoder(separators=(",", ":")).encode
    t0 = time.monotonic()
    for i in range(n):
        value = dumps({"n": i, "amount": i % 7}).encode()
        key = b"u%d" % (i % keys)
        produce(producer, topic, value, key, on_delivery=delivered)
        if i % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left or failures:
        raise RuntimeError(f"pre-producing failed: {left} unacknowledged, errors {failures[:3]}")
    elapsed = time.monotonic() - t0
    odd = {p: (ends.get(p), c) for p, c in per_partition.items() if ends.get(p) != c}
    note = f"input offsets not dense ({{partition: (end, records)}} {odd}); " if odd else ""
    return elapsed, ends, note


def committed_offsets(consumer: Consumer, topic: str, partitions: int) -> Dict[int, int]:
    """The group's committed offsets of ``topic`` (0 where none)."""
    got = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=5)
    return {tp.partition: max(tp.offset, 0) for tp in got}


def read_changelog(bootstrap: str, topic: str, timeout: float) -> List[ChangelogRow]:
    """Every record of a changelog topic, read until each partition reports its end (the
    fetch response's high watermark; tansu's ListOffsets is not reliable)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    rows: List[ChangelogRow] = []
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        pending = set(parts)
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic}: partitions {sorted(pending)} reported no end "
                                   f"within {timeout:.0f}s")
            for msg in consumer.consume(10_000, 0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(msg.partition())
                    continue
                src_p = src_o = None
                for name, hval in msg.headers() or ():
                    if name == HDR_SRC_PARTITION:
                        src_p = int(hval)
                    elif name == HDR_SRC_OFFSET:
                        src_o = int(hval)
                kind, ts = msg.timestamp()
                rows.append((kind, ts, msg.key(), msg.value(), src_p, src_o))
    finally:
        consumer.close()
    return rows


def changelog_view(rows: List[ChangelogRow]) -> Dict[str, Any]:
    """The compacted view of a changelog (last value per key), keys and values decoded."""
    view: Dict[str, Any] = {}
    for _kind, _ts, key, value, _p, _o in rows:
        k = json.loads(key)
        if value is None:
            view.pop(k, None)
        else:
            view[k] = json.loads(value)
    return view


def bare_consume_rate(bootstrap: str, topic: str, expect: int) -> float:
    """Records/s of a bare consume loop over partition 0 of ``topic`` taking each record's
    key, value, headers and offset (what a restore reads), with the restore consumer's
    fetch settings: the ceiling this broker and client set for any restore."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bare-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "fetch.wait.max.ms": 10, "log.connection.close": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    seen = 0
    t0 = time.perf_counter()
    try:
        while True:
            msgs = consumer.consume(10_000, 0.05)
            if any(m.error() is not None and m.error().code() == KafkaError._PARTITION_EOF
                   for m in msgs[-1:]):
                seen += len(msgs) - 1
                break
            for msg in msgs:
                msg.key(), msg.value(), msg.headers(), msg.offset()
            seen += len(msgs)
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("the bare consumer found no end within 300 s")
    finally:
        consumer.close()
    if seen != expect:
        raise RuntimeError(f"the bare consumer read {seen} records, not {expect}")
    return seen / (time.perf_counter() - t0)

