"""The stream graph (issue 13): sub-topologies, re-keying through a repartition topic,
tables fed by several topics, a word count through ``topic.send``; exact under both
guarantees and across kill -9 of children, with records from a default
``confluent_kafka.Producer`` (its own partitioner)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from typing import Dict, List, Optional

import pytest
from confluent_kafka import Producer

from tests.conftest import ROOT

APP = "tests.apps.graph"
CUSTOMERS = 12
VOCABULARY = [f"w{i}" for i in range(40)]


def produce_default(broker: str, topic: str, records: List[tuple],
                    config: Optional[Dict[str, object]] = None) -> None:
    """``(key, value)`` records from a producer with librdkafka's defaults (its own
    partitioner, consistent_random), as a Python user's producer sends them."""
    producer = Producer({"bootstrap.servers": broker, **(config or {})})
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(30) == 0


def table(datadir: str, name: str, prefix: str) -> Dict:
    result = subprocess.run([sys.executable, "-m", "supervisor", "table", "-A", APP,
                             "--datadir", datadir, name], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SHARDSUP_TEST_PREFIX": prefix})
    if result.returncode != 0:
        return {}  # no task state yet
    return json.loads(result.stdout)


def wait_for_table(sup, datadir: str, name: str, prefix: str, expected: Dict, timeout: float,
                   ) -> None:
    """Waits until table ``name`` is exactly ``expected`` (a double count never is)."""
    seen: Dict = {}

    def exact() -> bool:
        nonlocal seen
        seen = table(datadir, name, prefix)
        return seen == expected

    try:
        sup.wait_for(exact, timeout, f"table {name} to be exact")
    except AssertionError:
        wrong = {k: (seen.get(k), v) for k, v in expected.items() if seen.get(k) != v}
        raise AssertionError(f"table {name}: (got, expected) where they differ: {wrong}; "
                             f"extra keys {set(seen) - set(expected)}\n{sup.output()[-4000:]}")


def where_the_group_stands(broker: str, prefix: str, sup) -> str:
    """For a failure: the group's offsets and each partition's end, read_committed and
    read_uncommitted, on the orders and repartition topics, and the supervisor's dump."""
    from tests.conftest import committed_offsets, dump_of, end_offsets

    lines = []
    for topic in (f"{prefix}-orders", f"{prefix}-by-customer-repartition"):
        for isolation in ("read_committed", "read_uncommitted"):
            lines.append(f"{topic} {isolation}: group "
                         f"{committed_offsets(broker, prefix, topic, 4, isolation)} end "
                         f"{end_offsets(broker, topic, 4, isolation)}")
    return "\n".join(lines) + "\n" + dump_of(sup)


def orders(start: int, stop: int) -> List[tuple]:
    """Orders keyed by order id; customer and amount derived from the id."""
    return [(f"o{n}".encode(), json.dumps({"id": n, "customer": f"c{n % CUSTOMERS}",
                                           "amount": n % 5 + 1}).encode())
            for n in range(start, stop)]


def expected_spend(stop: int):
    sums: Dict[str, int] = {}
    counts: Dict[str, int] = {}
    for n in range(stop):
        customer = f"c{n % CUSTOMERS}"
        sums[customer] = sums.get(customer, 0) + n % 5 + 1
        counts[customer] = counts.get(customer, 0) + 1
    return sums, counts


@pytest.mark.timeout(150)
def test_word_count_through_topic_send_is_exact(broker, prefix, start_supervisor):
    rng = random.Random(13)
    lines = [" ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 8))) for _ in range(400)]
    expected: Dict[str, int] = {}
    for line in lines:
        for word in line.split():
            expected[word] = expected.get(word, 0) + 1
    sup = start_supervisor(APP, "-c", "2")
    sup.wait_for(lambda: "sub-topologies" in sup.output(), 60, "the supervisor to start")
    produce_default(broker, f"{prefix}-lines", [(None, line.encode()) for line in lines])
    wait_for_table(sup, sup.datadir, "word_counts", prefix, expected, 90)
    assert sup.stop() == 0


@pytest.mark.timeout(150)
def test_group_by_then_count_is_exact_under_exactly_once(broker, prefix, start_supervisor):
    sup = start_supervisor(APP, "-c", "2", env={"SHARDSUP_TEST_GUARANTEE": "exactly_once"})
    sup.wait_for(lambda: "sub-topologies" in sup.output(), 60, "the supervisor to start")
    produce_default(broker, f"{prefix}-orders", orders(0, 600))
    sums, counts = expected_spend(600)
    wait_for_table(sup, sup.datadir, "orders_seen", prefix, counts, 100)
    wait_for_table(sup, sup.datadir, "by_customer", prefix, sums, 30)
    assert sup.stop() == 0


@pytest.mark.timeout(240)
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_group_by_then_count_is_exact_across_three_kill_9(
        broker, prefix, start_supervisor, tmp_path, guarantee):
    """Three times, re-keying an order stalls the child (fault injection) after it
    forwarded part of its batch and reported (or committed) none of it; the test kills it
    -9 then.  Its successor forwards those orders again (at least once; exactly-once, the
    killed transaction is aborted, and the test broker still shows its records to
    ``read_committed`` readers), and the counting task skips what it applied already:
    no order counts twice."""
    stall_at = [250, 850, 1450]
    sup = start_supervisor(APP, "-c", "2", env={
        "SHARDSUP_TEST_GUARANTEE": guarantee,
        "SHARDSUP_TEST_STALL_DIR": str(tmp_path),
        "SHARDSUP_TEST_STALL_AT": ",".join(map(str, stall_at))})
    sup.wait_for(lambda: "sub-topologies" in sup.output(), 60, "the supervisor to start")
    total = 1600
    for start in range(0, total, 400):
        produce_default(broker, f"{prefix}-orders", orders(start, start + 400))
    killed: List[int] = []

    def kill_the_stalled() -> bool:
        # the stalls come in any order, two children may stall at once: kill each as seen
        for order in stall_at:
            marker = tmp_path / f"stall-{order}"
            if order not in killed and marker.exists():
                os.kill(int(marker.read_text()), signal.SIGKILL)
                killed.append(order)
        return len(killed) == len(stall_at)

    sup.wait_for(kill_the_stalled, 90, "three children to stall (each is killed -9)")
    sums, counts = expected_spend(total)
    try:
        wait_for_table(sup, sup.datadir, "orders_seen", prefix, counts, 150)
    except AssertionError as stuck:
        raise AssertionError(f"{stuck}\n{where_the_group_stands(broker, prefix, sup)}")
    wait_for_table(sup, sup.datadir, "by_customer", prefix, sums, 30)
    assert sup.output().count("died with code -9") == 3, sup.output()[-3000:]
    assert "sent no heartbeat" not in sup.output()
    assert sup.stop() == 0


@pytest.mark.timeout(120)
def test_a_table_fed_by_two_topics_joins_a_re_keyed_stream(broker, prefix, start_supervisor):
    """A stream–table join on a co-partitioned table: names come from the customers
    topic (produced with Java's partitioner, as Kafka Streams and Faust producers do),
    orders are re-keyed to the customer, and each output carries the customer's name."""
    sup = start_supervisor(APP, "-c", "2")
    sup.wait_for(lambda: "sub-topologies" in sup.output(), 60, "the supervisor to start")
    names = {f"c{i}": f"name-{i}" for i in range(CUSTOMERS)}
    produce_default(broker, f"{prefix}-customers",
                    [(k.encode(), json.dumps({"name": v}).encode()) for k, v in names.items()],
                    {"partitioner": "murmur2_random"})
    wait_for_table(sup, sup.datadir, "names", prefix, names, 60)
    produce_default(broker, f"{prefix}-orders", orders(0, 200))
    from tests.conftest import read_topic

    outputs = read_topic(broker, f"{prefix}-out", 200, 60)
    got = {json.loads(m.value())["order"]: json.loads(m.value()) for m in outputs}
    assert len(got) == 200
    assert all(o["name"] == names[o["customer"]] for o in got.values()), \
        [o for o in got.values() if o["name"] != names[o["customer"]]][:5]
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_start_is_refused_for_topics_that_are_not_co_partitioned(broker, prefix, start_supervisor):
    from tests.conftest import create_topic

    create_topic(broker, f"{prefix}-clicks", 3)
    create_topic(broker, f"{prefix}-views", 2)
    sup = start_supervisor("tests.apps.two_feeds", "-c", "1")
    code = sup.stop(sig=None, timeout=50)
    lines = [line for line in sup.output().splitlines() if "co-partitioned" in line]
    assert code != 0
    assert len(lines) == 1 and f"{prefix}-clicks[3], {prefix}-views[2]" in lines[0], \
        sup.output()[-2000:]


@pytest.mark.timeout(120)
def test_a_table_fed_by_two_topics_and_a_loop_moved_through_a_topic_are_exact(
        broker, prefix, start_supervisor):
    from tests.conftest import create_topic

    create_topic(broker, f"{prefix}-clicks", 3)
    create_topic(broker, f"{prefix}-views", 3)
    sup = start_supervisor("tests.apps.two_feeds", "-c", "2")
    sup.wait_for(lambda: "sub-topologies" in sup.output(), 60, "the supervisor to start")
    clicks = [(f"k{n % 10}".encode(), b"{}") for n in range(300)]
    views = [(f"k{n % 7}".encode(), b"{}") for n in range(200)]
    events = [(f"e{n % 5}".encode(), b"{}") for n in range(100)]
    produce_default(broker, f"{prefix}-clicks", clicks)
    produce_default(broker, f"{prefix}-views", views)
    produce_default(broker, f"{prefix}-events", events)
    expected: Dict[str, int] = {}
    for key, _v in clicks + views:
        expected[key.decode()] = expected.get(key.decode(), 0) + 1
    audited = {f"e{k}": 20 for k in range(5)}

    def read(name: str) -> Dict:
        result = subprocess.run([sys.executable, "-m", "supervisor", "table", "-A",
                                 "tests.apps.two_feeds", "--datadir", sup.datadir, name],
                                cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "SHARDSUP_TEST_PREFIX": prefix})
        return json.loads(result.stdout) if result.returncode == 0 else {}

    sup.wait_for(lambda: read("seen") == expected, 90, f"seen == {expected}")
    sup.wait_for(lambda: read("audit_counts") == audited, 60, f"audit_counts == {audited}")
    assert "(tables seen)" in sup.output() and f"{prefix}-audited" in sup.output()
    assert sup.stop() == 0
