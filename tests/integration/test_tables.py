"""Exact table state through crashes, failover and bad input (real broker, real processes)."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Dict, Optional, Tuple

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from shardworker.tablecli import window_label
from tests.conftest import ROOT, read_to_end, read_topic

#: tansu keeps the records of aborted transactions visible to read_committed consumers
#: (DESIGN.md), so "each output exactly once" after a kill is checked on a real Kafka only
KAFKA_HONOURS_ABORTS = bool(os.environ.get("SHARDSUP_TEST_BROKER"))

N = 100_000
KEYS = 1000


def truth(count: int) -> Tuple[Counter, Counter]:
    counts: Counter = Counter()
    sums: Counter = Counter()
    for n in range(count):
        counts[f"u{n % KEYS}"] += 1
        sums[f"u{n % KEYS}"] += n % 7
    return counts, sums


def produce_orders(broker: str, topic: str, start: int, stop: int,
                   partitioner: Optional[str] = "murmur2_random") -> None:
    """Keyed by user; partitioned by Java Kafka's partitioner unless ``partitioner`` says
    otherwise (None: the producer's default, librdkafka's consistent_random)."""
    config = {"bootstrap.servers": broker, "linger.ms": 10, "enable.idempotence": True}
    if partitioner is not None:
        config["partitioner"] = partitioner
    producer = Producer(config)
    for n in range(start, stop):
        while True:
            try:
                producer.produce(topic, json.dumps({"n": n, "amount": n % 7}).encode(),
                                 f"u{n % KEYS}".encode())
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(30) == 0


def table(datadir: str, name: str, prefix: str) -> Dict:
    result = subprocess.run([sys.executable, "-m", "supervisor", "table", "-A", "tests.apps.counter",
                             "--datadir", datadir, name], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SHARDSUP_TEST_PREFIX": prefix})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def changelog_view(broker: str, topic: str) -> Dict[str, int]:
    """The compacted view of a changelog: the last value per key."""
    messages = read_to_end(broker, topic)
    view: Dict[str, int] = {}
    for msg in messages:
        key = json.loads(msg.key())
        if msg.value() is None:
            view.pop(key, None)
        else:
            view[key] = json.loads(msg.value())
    return view


def wait_for_total(datadirs, prefix: str, total: int, timeout: float) -> Dict[str, int]:
    deadline = time.monotonic() + timeout
    merged: Dict[str, int] = {}
    while time.monotonic() < deadline:
        merged = {}
        for datadir in datadirs:
            merged.update(table(datadir, "counts", prefix))
        seen = sum(merged.values())
        assert seen <= total, f"double counting: {seen} > {total}"
        if seen == total:
            return merged
        time.sleep(1.0)
    raise AssertionError(f"counted {sum(merged.values())} of {total} within {timeout}s")


class OutputWatch:
    """Follows ``<prefix>-out`` of tests.apps.counter (each output is its input's number)
    from the beginning, reading uncommitted outputs too, so a test reacts to the first
    output of a stage at once rather than after a guessed sleep."""

    def __init__(self, broker: str, topic: str) -> None:
        self.consumer = Consumer({"bootstrap.servers": broker, "group.id": f"watch-{topic}",
                                  "enable.auto.commit": False,
                                  "isolation.level": "read_uncommitted"})
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(4)])
        self.highest = -1

    def __enter__(self) -> "OutputWatch":
        return self

    def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
        self.consumer.close()

    def wait_for_at_least(self, number: int, timeout: float, sup) -> None:  # type: ignore[no-untyped-def]
        """Returns once an output of ``number`` or above was seen."""
        def seen() -> bool:
            for msg in self.consumer.consume(1000, 0.1):
                if msg.error() is None and msg.value() is not None:
                    self.highest = max(self.highest, json.loads(msg.value()))
            return self.highest >= number

        sup.wait_for(seen, timeout, f"an output of {number} or above")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_counts_are_exact_through_five_kill_9s(broker, prefix, start_supervisor, guarantee):
    sup = start_supervisor("tests.apps.counter", "-c", "2",
                           env={"SHARDSUP_TEST_WORK_US": "60", "SHARDSUP_TEST_GUARANTEE": guarantee})
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    # six stages of input, a kill between each two: each kill follows the first outputs of
    # the stage before it, and the next stage is produced after it, so records flow at
    # every kill however fast the machine (no "stream over before the kills")
    bounds = [N * stage // 6 for stage in range(7)]
    rng = random.Random(7)
    with OutputWatch(broker, f"{prefix}-out") as watch:
        for low, high in zip(bounds, bounds[1:]):
            produce_orders(broker, f"{prefix}-in", low, high)
            if high == N:
                break
            watch.wait_for_at_least(low, 60, sup)
            sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
            victim = rng.choice(sorted(sup.child_tasks()))
            os.kill(victim, signal.SIGKILL)
    counts, sums = truth(N)
    got = wait_for_total([sup.datadir], prefix, N, timeout=150)
    assert got == dict(counts)
    assert table(sup.datadir, "sums", prefix) == dict(sums)
    assert sup.output().count("died with code -9") == 5
    assert changelog_view(broker, f"{prefix}-counts-changelog") == dict(counts)
    assert changelog_view(broker, f"{prefix}-sums-changelog") == dict(sums)
    assert sup.stop() == 0
    outputs = Counter(json.loads(msg.value()) for msg in read_to_end(broker, f"{prefix}-out"))
    assert set(outputs) == set(range(N)), "an output was lost"
    if guarantee == "exactly_once" and KAFKA_HONOURS_ABORTS:
        assert max(outputs.values()) == 1, "a read_committed consumer saw an output twice"


@pytest.mark.timeout(120)
def test_an_aborted_transaction_is_read_again_without_counting_twice(broker, prefix,
                                                                    start_supervisor):
    """The first transaction carrying offsets of each task is aborted on the broker (as
    when the group moved on): its records are processed again, its table changes are not
    kept."""
    sup = start_supervisor("tests.apps.counter", "-c", "1",
                           env={"SHARDSUP_TEST_GUARANTEE": "exactly_once",
                                "SHARDSUP_TEST_ABORT_FIRST_COMMIT": "1"})
    sup.wait_for(lambda: len(sup.child_tasks()) == 1, 30, "one child")
    produce_orders(broker, f"{prefix}-in", 0, 20_000)
    counts, sums = truth(20_000)
    assert wait_for_total([sup.datadir], prefix, 20_000, timeout=60) == dict(counts)
    assert table(sup.datadir, "sums", prefix) == dict(sums)
    assert changelog_view(broker, f"{prefix}-counts-changelog") == dict(counts)
    assert sup.stop() == 0
    for task in ("0_0", "0_1", "0_2", "0_3"):
        assert f"task {task}: transaction aborted: planted; reading its records again" in sup.output()
    assert "died with code" not in sup.output()
    outputs = {json.loads(msg.value()) for msg in read_to_end(broker, f"{prefix}-out")}
    assert outputs == set(range(20_000))


@pytest.mark.timeout(240)
def test_failover_restores_from_the_changelog_exactly(broker, prefix, start_supervisor):
    first = start_supervisor("tests.apps.counter", "-c", "2", name="one")
    first.wait_for(lambda: len(first.child_tasks()) == 2, 30, "first's children")
    second = start_supervisor("tests.apps.counter", "-c", "2", name="two")
    second.wait_for(lambda: sum(len(t) for t in second.child_tasks().values()) == 2, 60, "tasks shared")
    produce_orders(broker, f"{prefix}-in", 0, N // 2)
    wait_for_total([first.datadir, second.datadir], prefix, N // 2, timeout=120)
    assert second.stop() == 0
    shutil.rmtree(second.datadir)  # its machine is gone
    first.wait_for(lambda: sum(len(t) for t in first.child_tasks().values()) == 4, 60,
                   "the survivor to take every task")
    produce_orders(broker, f"{prefix}-in", N // 2, N)
    counts, sums = truth(N)
    assert wait_for_total([first.datadir], prefix, N, timeout=150) == dict(counts)
    assert table(first.datadir, "sums", prefix) == dict(sums)
    assert "restored" in first.output()
    assert first.stop() == 0


@pytest.mark.timeout(120)
def test_windows_bad_input_and_the_table_command(broker, prefix, start_supervisor):
    sup = start_supervisor("tests.apps.counter", "-c", "1")
    sup.wait_for(lambda: len(sup.child_tasks()) == 1, 30, "one child")
    producer = Producer({"bootstrap.servers": broker, "partitioner": "murmur2_random"})
    base = 1_700_000_040_000  # a minute boundary (ms)
    stamps = [base + 1_000, base + 59_000, base + 61_000, base + 95_000]
    for ts in stamps:
        producer.produce(f"{prefix}-in", json.dumps({"amount": 1}).encode(), b"w", timestamp=ts)
    producer.produce(f"{prefix}-in", json.dumps({"amount": "x"}).encode(), b"w", timestamp=base + 2_000)
    producer.produce(f"{prefix}-in", b"{broken", b"w", timestamp=base + 3_000)
    # rejected by the agent: its timestamp (year 2100) must not expire the open windows
    producer.produce(f"{prefix}-in", json.dumps({"amount": "2100"}).encode(), b"w",
                     timestamp=4_102_444_800_000)
    assert producer.flush(20) == 0
    sup.wait_for(lambda: (lambda t: sum(t.get("w", {}).values()) == 4)(table(sup.datadir, "per_minute", prefix)),
                 60, "four records in the tumbling windows")
    def window(start_s: int, size_s: int = 60) -> str:
        return window_label(base + start_s * 1000, base + (start_s + size_s) * 1000)

    assert table(sup.datadir, "per_minute", prefix) == {"w": {window(0): 2, window(60): 2}}
    # hopping 60 s every 30 s: each record is in two windows
    hop = table(sup.datadir, "hopping", prefix)["w"]
    assert hop == {window(-30): 1, window(0): 2, window(30): 2, window(60): 2, window(90): 1}
    # the three bad records went to the dead-letter topic and touched no table
    assert table(sup.datadir, "counts", prefix) == {"w": 4}
    dead = read_topic(broker, f"{prefix}-count-dlq", 3, timeout=30)
    assert len(dead) == 3
    # a record two hours later expires the first windows (expires=3600 s)
    producer.produce(f"{prefix}-in", json.dumps({"amount": 5}).encode(), b"w", timestamp=base + 7_300_000)
    assert producer.flush(20) == 0
    sup.wait_for(lambda: table(sup.datadir, "per_minute", prefix) == {"w": {window(7260): 5}},
                 60, "expired windows to disappear from LMDB")
    assert sup.stop() == 0
    messages = read_to_end(broker, f"{prefix}-per_minute-changelog")
    assert sum(1 for x in messages if x.value() is None) == 2, "expired windows not tombstoned"
    result = subprocess.run([sys.executable, "-m", "supervisor", "table", "-A", "tests.apps.counter",
                             "--datadir", sup.datadir, "counts", '"w"'], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, env={**os.environ, "SHARDSUP_TEST_PREFIX": prefix})
    assert result.returncode == 0 and json.loads(result.stdout) == 5, result.stderr


@pytest.mark.timeout(120)
def test_counts_are_exact_with_the_default_producers_partitioner(broker, prefix, start_supervisor):
    """Records from a plain ``confluent_kafka.Producer()`` (consistent_random, not
    murmur2): every table write is accepted and the counts are exact."""
    sup = start_supervisor("tests.apps.counter", "-c", "2")
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    produce_orders(broker, f"{prefix}-in", 0, 20_000, partitioner=None)
    counts, sums = truth(20_000)
    assert wait_for_total([sup.datadir], prefix, 20_000, timeout=90) == dict(counts)
    assert table(sup.datadir, "sums", prefix) == dict(sums)
    assert sup.stop() == 0
    assert "dead-lettered" not in sup.output()


@pytest.mark.timeout(240)
def test_the_table_command_shows_only_the_tasks_the_datadir_owns(broker, prefix, start_supervisor):
    """Tasks that moved to another supervisor leave a stale copy in the first datadir:
    ``shardsup table`` there shows only the tasks it still holds, each exact."""
    first = start_supervisor("tests.apps.counter", "-c", "2", name="one")
    first.wait_for(lambda: sum(len(t) for t in first.child_tasks().values()) == 4, 30,
                   "every task in the first")
    produce_orders(broker, f"{prefix}-in", 0, N // 4)
    wait_for_total([first.datadir], prefix, N // 4, timeout=60)
    second = start_supervisor("tests.apps.counter", "-c", "2", name="two")
    second.wait_for(lambda: sum(len(t) for t in second.child_tasks().values()) == 2, 60,
                    "tasks shared")
    first.wait_for(lambda: sum(len(t) for t in first.child_tasks().values()) == 2, 60,
                   "the first to give two tasks away")
    produce_orders(broker, f"{prefix}-in", N // 4, N // 2)
    counts, _sums = truth(N // 2)
    deadline = time.monotonic() + 120
    while True:
        one, two = table(first.datadir, "counts", prefix), table(second.datadir, "counts", prefix)
        if sum(one.values()) + sum(two.values()) == N // 2 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not set(one) & set(two), "a key shown by both datadirs"
    assert {**one, **two} == dict(counts)
    assert first.stop() == 0 and second.stop() == 0
