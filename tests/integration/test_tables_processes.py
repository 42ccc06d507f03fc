"""The tests of the table storage layer that need a broker or other processes (moved
from tests/unit/test_tables_units.py, which keeps the rest): the Java partitioner checked
against librdkafka through a real broker, a kill -9 in the middle of store commits, and a
reader process beside the writer."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from typing import Dict, List

import pytest
from confluent_kafka import Producer

from shardworker.partitioner import partition_for
from shardworker.store import StoreBusyError, TaskStore
from tests.conftest import ROOT, create_topic


@pytest.mark.timeout(60)
def test_partition_for_agrees_with_librdkafka_murmur2_random(broker):
    topic = f"murmur-{uuid.uuid4().hex[:8]}"
    partitions = 7
    create_topic(broker, topic, partitions)
    producer = Producer({"bootstrap.servers": broker, "partitioner": "murmur2_random",
                         "linger.ms": 5})
    keys = [f"user-{i}".encode() for i in range(300)] + [
        os.urandom(n) for n in range(1, 40)] + ["ключ-ü".encode(), b"\x00\xff" * 9]
    got: Dict[bytes, int] = {}
    errors: List[str] = []

    def delivered(err, msg) -> None:  # type: ignore[no-untyped-def]
        if err is not None:
            errors.append(err.str())
        else:
            got[msg.key()] = msg.partition()

    for key in keys:
        producer.produce(topic, b"v", key, on_delivery=delivered)
    assert producer.flush(30) == 0
    assert not errors
    assert len(got) == len(keys)
    mismatches = {k: (p, partition_for(k, partitions)) for k, p in got.items()
                  if p != partition_for(k, partitions)}
    assert not mismatches
    assert len(set(got.values())) == partitions  # the keys really spread


KILLED_WRITER = textwrap.dedent("""
    import sys
    from shardworker.store import TaskStore
    store = TaskStore(sys.argv[1], ["t"], map_size=1 << 20)
    i = store.input_offset("src", 0) or 0
    print("ready", flush=True)
    for done in range(1, 1 << 62):  # every commit: 200 keys = i and the offset i + 1, together
        store.commit({"t": {b"k%03d" % n: b"%d" % i for n in range(200)}},
                     {("src", 0): i + 1}, {"t": i})
        i += 1
        if done == 50:  # the test kills on this line: mid-stream, on any machine speed
            print("committing", flush=True)
""")


@pytest.mark.timeout(60)
def test_kill_9_during_commits_never_splits_state_from_offsets(tmp_path):
    path = str(tmp_path / "s")
    for _round in range(3):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, path], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().strip() == "committing"  # 50 commits done, more under way
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        store = TaskStore(path, ["t"], map_size=1 << 20)
        offset = store.input_offset("src", 0)
        values = {v for _k, v in store.items("t")}
        assert offset is not None and offset >= 50 * (_round + 1), "50 commits a round were made"
        assert values == {b"%d" % (offset - 1)} and store.count("t") == 200
        assert store.changelog_offset("t") == offset - 1
        store.close()


READER = textwrap.dedent("""
    import sys, json
    from shardworker.store import open_readonly
    store = open_readonly(sys.argv[1])
    print(json.dumps({"tables": store.tables}), flush=True)
    for line in sys.stdin:
        key = line.strip().encode()
        value = store.get("counts", key)
        print(json.dumps({"value": None if value is None else value.decode(),
                          "offset": store.input_offset("src", 0),
                          "entries": store.count("counts"),
                          "map": store.map_size}), flush=True)
    store.close()
""")


@pytest.mark.timeout(60)
def test_another_process_reads_while_the_writer_holds_the_store(tmp_path):
    path = str(tmp_path / "s")
    writer = TaskStore(path, ["counts"], map_size=256 * 1024)
    writer.commit({"counts": {b"a": b"1"}}, {("src", 0): 5}, {})
    reader = subprocess.Popen([sys.executable, "-c", READER, path], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdin is not None and reader.stdout is not None

    def ask(key: str) -> dict:
        reader.stdin.write(key + "\n")
        reader.stdin.flush()
        return json.loads(reader.stdout.readline())

    try:
        assert json.loads(reader.stdout.readline()) == {"tables": ["counts"]}
        assert ask("a") == {"value": "1", "offset": 5, "entries": 1, "map": 256 * 1024}
        # the writer goes on (and grows its map) while the reader keeps its environment open
        writer.commit({"counts": {b"a": b"2", b"b": b"x" * 500}}, {("src", 0): 6}, {})
        assert ask("a")["value"] == "2"
        big = os.urandom(1000)
        for n in range(8):
            writer.commit({"counts": {b"big%d-%d" % (n, i): big for i in range(200)}},
                          {("src", 0): 7 + n}, {})
        assert writer.map_size > 256 * 1024
        answer = ask("b")
        assert answer["value"] == "x" * 500 and answer["offset"] == 14
        assert answer["entries"] == 1602 and answer["map"] == writer.map_size
        # a second writer is refused, readers are not
        with pytest.raises(StoreBusyError):
            TaskStore(path, ["counts"])
    finally:
        reader.stdin.close()
        assert reader.wait(10) == 0
        reader.stdout.close()
        writer.close()
