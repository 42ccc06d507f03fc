"""End to end through a real broker and real ``shardsup start`` processes."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import committed_offsets, create_topic, produce, read_topic

N = 20_000
PARTS = 4


def records(start: int, stop: int):
    """(key, value, partition): key k<n>, spread evenly over the partitions."""
    return [(f"k{n}".encode(), json.dumps({"n": n}).encode(), n % PARTS) for n in range(start, stop)]


def check_outputs(messages, expected_ns):
    """Every input n reached the sink, keyed like its input, with the right value."""
    seen = {}
    for msg in messages:
        value = json.loads(msg.value())
        assert msg.key() == f"k{value['n']}".encode(), "output keyed unlike its input"
        assert value["doubled"] == 2 * value["n"]
        seen[value["n"]] = True
    missing = set(expected_ns) - set(seen)
    assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:5]}"


@pytest.mark.timeout(150)
def test_every_record_reaches_the_sink_with_two_children(broker, prefix, start_supervisor):
    sup = start_supervisor("tests.apps.doubler", "-c", "2")
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    ends = produce(broker, f"{prefix}-in", records(0, N))
    out = read_topic(broker, f"{prefix}-out", N, timeout=90)
    check_outputs(out, range(N))

    tasks = sup.child_tasks()
    assert len(tasks) == 2, tasks
    all_tasks = [t for ts in tasks.values() for t in ts]
    assert sorted(all_tasks) == ["0_0", "0_1", "0_2", "0_3"], tasks
    assert len(set(all_tasks)) == len(all_tasks), f"tasks overlap: {tasks}"

    assert sup.stop(signal.SIGTERM) == 0, sup.output()[-3000:]
    assert committed_offsets(broker, prefix, f"{prefix}-in", PARTS) == ends
    assert "warm shutdown complete" in sup.output()


@pytest.mark.timeout(150)
def test_kill_9_of_a_child_mid_stream_loses_nothing(broker, prefix, start_supervisor):
    # the kill lands mid-stream by construction, however fast the machine: it follows the
    # first outputs of the first half, and the second half is produced after it
    sup = start_supervisor("tests.apps.doubler", "-c", "2", env={"SHARDSUP_TEST_WORK_US": "200"})
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    produce(broker, f"{prefix}-in", records(0, N // 2))
    victim = min(sup.child_tasks())
    read_topic(broker, f"{prefix}-out", 0, timeout=30, until=lambda msgs: len(msgs) >= 500)
    os.kill(victim, signal.SIGKILL)
    produce(broker, f"{prefix}-in", records(N // 2, N))
    out = read_topic(broker, f"{prefix}-out", N, timeout=90)
    check_outputs(out, range(N))
    sup.wait_for(lambda: len(sup.child_tasks()) == 2 and victim not in sup.child_tasks(), 15,
                 "the killed child to be replaced")
    assert f"died with code -9" in sup.output()
    assert sup.stop() == 0


@pytest.mark.timeout(200)
def test_second_supervisor_takes_over_half_the_tasks(broker, prefix, start_supervisor):
    first = start_supervisor("tests.apps.doubler", "-c", "2", name="first")
    first.wait_for(lambda: len(first.child_tasks()) == 2, 30, "first supervisor's children")
    produce(broker, f"{prefix}-in", records(0, N // 2))
    second = start_supervisor("tests.apps.doubler", "-c", "2", name="second")

    def split() -> bool:
        a = [t for ts in first.child_tasks().values() for t in ts]
        b = [t for ts in second.child_tasks().values() for t in ts]
        return len(a) == 2 and len(b) == 2 and not set(a) & set(b)

    before = first.child_tasks()
    first.wait_for(split, 60, "the tasks to be split two and two")
    # only tasks that moved were stopped: the first supervisor's remaining tasks still
    # run in the children that had them, which were never restarted
    for pid, tasks in first.child_tasks().items():
        assert pid in before and set(tasks) <= set(before[pid]), (before, first.child_tasks())
    produce(broker, f"{prefix}-in", records(N // 2, N))
    out = read_topic(broker, f"{prefix}-out", N, timeout=90)
    check_outputs(out, range(N))
    assert second.stop() == 0, second.output()[-3000:]
    assert first.stop() == 0, first.output()[-3000:]


@pytest.mark.timeout(90)
def test_plain_def_agent_with_items(broker, prefix, start_supervisor):
    sup = start_supervisor("tests.apps.sync_doubler", "-c", "1")
    sup.wait_for(lambda: len(sup.child_tasks()) == 1, 30, "one child")
    produce(broker, f"{prefix}-in", [(f"k{n}".encode(), json.dumps({"n": n}).encode(), n % 2)
                                     for n in range(2000)])
    out = read_topic(broker, f"{prefix}-out", 2000, timeout=60)
    values = [json.loads(m.value()) for m in out]
    assert {v["n"] for v in values} == set(range(2000))
    assert all(v["key"] == f"k{v['n']}" and v["doubled"] == 2 * v["n"] for v in values)
    assert sup.stop() == 0


@pytest.mark.timeout(90)
def test_bad_records_go_to_the_dead_letter_topic(broker, prefix, start_supervisor):
    sup = start_supervisor("tests.apps.doubler", "-c", "1")
    sup.wait_for(lambda: len(sup.child_tasks()) == 1, 30, "one child")
    batch = records(0, 1000)
    batch[100] = (b"undecodable", b"{not json", 0)
    batch[501] = (b"boom", json.dumps({"n": 501, "boom": True}).encode(), 1)
    produce(broker, f"{prefix}-in", batch)
    out = read_topic(broker, f"{prefix}-out", 998, timeout=60)
    check_outputs(out, set(range(1000)) - {100, 501})
    dead = read_topic(broker, f"{prefix}-double-dlq", 2, timeout=30)
    by_key = {m.key(): dict(m.headers()) for m in dead}
    assert set(by_key) == {b"undecodable", b"boom"}
    assert by_key[b"boom"]["shardsup.error"].startswith(b"ValueError: boom on n=501")
    assert by_key[b"undecodable"]["shardsup.offset"] == b"25"  # 100 // 4 on partition 0
    assert "dead-lettered" in sup.output()
    assert sup.stop() == 0


@pytest.mark.timeout(90)
def test_events_and_topic_send_with_headers(broker, prefix, start_supervisor):
    sup = start_supervisor("tests.apps.sender", "-c", "1")
    sup.wait_for(lambda: len(sup.child_tasks()) == 1, 30, "one child")
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": broker})
    for n in range(200):
        producer.produce(f"{prefix}-in", json.dumps({"n": n}).encode(), f"k{n}".encode(),
                         partition=n % 2, headers=[("trace", f"t{n}".encode())],
                         timestamp=1_700_000_000_000 + n)
    assert producer.flush(20) == 0
    out = read_topic(broker, f"{prefix}-out", 200, timeout=60)
    assert len({m.key() for m in out}) == 200
    for msg in out:
        value = json.loads(msg.value())
        n = value["n"]
        assert msg.key() == f"k{n}".encode()
        assert value["topic"] == f"{prefix}-in" and value["partition"] == n % 2
        assert value["offset"] == n // 2
        assert value["timestamp"] == pytest.approx(1_700_000_000 + n / 1000)
        headers = dict(msg.headers())
        assert headers["seen-by"] == b"describe" and headers["trace"] == f"t{n}".encode()
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_agent_send_puts_records_on_the_agents_topic(broker, prefix):
    """Faust's ``agent.send()``: the decorator returns the agent, which sends to its topic
    (and still calls through to the function)."""
    import asyncio

    import shardworker

    app = shardworker.App(prefix, broker=f"kafka://{broker}")
    source = app.topic(f"{prefix}-in", partitions=2, key_serializer="str")
    create_topic(broker, source.name, 2)

    @app.agent(source)
    async def relay(stream):
        async for value in stream:
            yield value

    assert app.agents[0] is relay and relay.name == "relay"
    asyncio.run(relay.send(key="k1", value={"n": 1}))
    relay.send_soon(key="k2", value={"n": 2})
    app.flush()
    got = read_topic(broker, source.name, 2, timeout=30)
    assert sorted((m.key(), json.loads(m.value())) for m in got) == [(b"k1", {"n": 1}),
                                                                      (b"k2", {"n": 2})]


@pytest.mark.timeout(90)
def test_the_readme_example_runs_on_the_embedded_broker(tmp_path):
    """What ./scripts/demo.sh runs: its own broker, its own input, visible output."""
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    log = open(tmp_path / "demo.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "start", "-A", "examples.orders",
                             "--broker", "embedded://", "-c", "2", "--datadir", str(tmp_path / "d")],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 40
        text = ""
        while time.monotonic() < deadline and text.count("spent=") < 20:
            time.sleep(0.5)
            text = (tmp_path / "demo.log").read_text(errors="replace")
        assert text.count("spent=") >= 20, text[-3000:]
        # two stages (re-keyed by user) and the global table's join: tiers are known
        assert "orders-demo-by-user-repartition" in text
        assert any(t in text for t in ("(gold)", "(silver)", "(bronze)")), text[-3000:]
        assert "embedded broker (tansu) listening on 127.0.0.1:" in text and "in memory only" in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
