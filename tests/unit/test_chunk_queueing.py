"""Step 1 of a chunk (the worker's ``_queue_at_once`` and ``_queue_each``): the common
chunk is decoded and queued at once, any other one record at a time, and both queue the
same records with the same tables; each record's offset reaches its task's batch through
the worker's positions.  Runs the worker on the agent test driver's edges (no broker)."""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from typing import Any, Iterator, List

import pytest

from shardworker import App
from shardworker.agentdriver import AgentDriver
from shardworker.codecs import batch_decoder
from shardworker.localkafka import LocalMessage
from shardworker.state import NO_TABLES
from shardworker.worker import Worker

#: what the agent saw, in order: (topic, key, n)
SEEN: List[Any] = []

app = App("q", broker="kafka://127.0.0.1:9")
orders = app.topic("orders", partitions=2, key_serializer="str", value_serializer="json")
refunds = app.topic("refunds", partitions=2, key_serializer="str", value_serializer="json")
counts = app.table("counts", default=int)


@app.agent([orders, refunds], on_error="dlq")
def tally(stream):  # type: ignore[no-untyped-def]
    for key, value in stream.items():
        SEEN.append((stream.current.topic(), key, value["n"]))
        counts[key] += value["n"]


@contextlib.contextmanager
def driven() -> Iterator[AgentDriver]:
    """The test driver's worker for ``tally``, both partitions' task open."""
    SEEN.clear()
    driver = AgentDriver(tally)
    driver._datadir = tempfile.mkdtemp(prefix="shardsup-queueing-")
    try:
        driver._setup()
        for p in range(2):
            driver._open_task("orders", p)
        yield driver
    finally:
        driver._teardown()
        shutil.rmtree(driver._datadir, ignore_errors=True)


def record(topic: str, partition: int, offset: int, key: str, value: bytes) -> LocalMessage:
    return LocalMessage(topic, partition, offset, key.encode(), value, None,
                        1_700_000_000_000 + offset)


def stored(driver: AgentDriver) -> Any:
    """Each task's counts and input offsets as LMDB holds them."""
    worker = driver.worker
    assert worker is not None
    return {task: ({kb.decode(): int(raw) for kb, raw in tables.store.items("counts")},
                   tables.store.input_offsets())
            for task, tables in worker.state.tasks.items()}


@pytest.mark.timeout(20)
def test_a_bad_value_in_a_one_topic_chunk_fails_alone_and_every_offset_counts() -> None:
    """The chunk cannot be decoded at once: one by one, the bad record is dead-lettered,
    the others are counted once, and the batch's offsets cover them all."""
    with driven() as driver:
        worker = driver.worker
        assert worker is not None
        chunk = [record("orders", 0, 0, "a", b'{"n": 1}'), record("orders", 0, 1, "a", b"{bad"),
                 record("orders", 0, 2, "a", b'{"n": 2}'), record("orders", 1, 0, "b", b'{"n": 5}')]
        worker.process_chunk(chunk)  # type: ignore[arg-type]
        worker.settle(block=True)
        assert SEEN == [("orders", "a", 1), ("orders", "a", 2), ("orders", "b", 5)]
        assert [(f.offset, f.value) for f in driver.dead_letters] == [(1, b"{bad")]
        assert stored(driver) == {"0_0": ({'"a"': 3}, {("orders", 0): 3}),
                                  "0_1": ({'"b"': 5}, {("orders", 1): 1})}


@pytest.mark.timeout(20)
def test_a_chunk_of_two_topics_reaches_the_agent_in_consumed_order() -> None:
    with driven() as driver:
        worker = driver.worker
        assert worker is not None
        chunk = [record("orders", 0, 0, "a", b'{"n": 1}'), record("refunds", 0, 0, "a", b'{"n": -1}'),
                 record("orders", 0, 1, "a", b'{"n": 4}')]
        worker.process_chunk(chunk)  # type: ignore[arg-type]
        worker.settle(block=True)
        assert SEEN == [("orders", "a", 1), ("refunds", "a", -1), ("orders", "a", 4)]
        assert stored(driver)["0_0"] == ({'"a"': 4}, {("orders", 0): 2, ("refunds", 0): 1})


@pytest.mark.timeout(20)
def test_queued_at_once_and_one_by_one_the_same_records_carry_the_same_tables() -> None:
    with driven() as driver:
        worker = driver.worker
        assert worker is not None
        chunk = [record("orders", p, o, f"k{o}", json.dumps({"n": o}).encode())
                 for o in range(3) for p in (1, 0)]
        sources = [(r.topic(), r.partition()) for r in chunk]
        buffer = worker.routes["orders"].buffers[0]
        assert worker._queue_at_once(chunk, sources, dict(zip(sources, chunk)))  # type: ignore[arg-type]
        at_once = list(buffer)
        buffer.clear()
        worker._queue_each(chunk, sources)  # type: ignore[arg-type]
        assert list(buffer) == at_once
        buffer.clear()
        tasks = worker.state.by_partition
        assert [(value, msg, tables) for value, msg, _source, tables, _ms in at_once] == [
            ({"n": o}, r, tasks[("orders", r.partition())]) for o, r in zip(
                [0, 0, 1, 1, 2, 2], chunk)]
        # a record of a partition whose task has no tables enters none
        worker.state.close("0_1")
        assert list(worker.state.tables_for([("orders", 1)])) == [NO_TABLES]


@pytest.mark.timeout(20)
def test_a_chunk_that_needs_a_look_at_each_record_is_not_queued_at_once() -> None:
    """Several topics; headers where the app's own records are looked for (origins); a
    tombstone: the worker queues nothing at once and goes one by one."""
    with driven() as driver:
        worker: Worker = driver.worker  # type: ignore[assignment]
        two_topics = [record("orders", 0, 0, "a", b'{"n": 1}'), record("refunds", 0, 0, "a", b'{"n": 1}')]
        with_headers = [LocalMessage("orders", 0, 1, b"a", b'{"n": 1}', [("x", b"1")], 1)]
        tombstone = [record("orders", 0, 2, "a", b'{"n": 1}'),
                     LocalMessage("orders", 0, 3, b"a", None, None, 1)]
        for chunk in (two_topics, with_headers, tombstone):
            sources = [(r.topic(), r.partition()) for r in chunk]
            assert not worker._queue_at_once(chunk, sources, dict(zip(sources, chunk)))  # type: ignore[arg-type]
            assert not worker.routes["orders"].buffers[0]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("loads_many", [
    lambda datas: map(json.loads, datas),  # lazy: fails as it is read
    lambda datas: [json.loads(d) for d in datas[:-1]],  # one value short
], ids=["lazy", "short"])
def test_a_loads_many_that_fails_late_or_returns_too_few_loses_no_record(loads_many: Any) -> None:
    """Whatever a codec's ``loads_many`` returns is checked before anything is queued:
    the chunk goes one by one, the bad record is dead-lettered, no other is lost."""
    with driven() as driver:
        worker: Worker = driver.worker  # type: ignore[assignment]
        worker.routes["orders"].decode_all = loads_many
        chunk = [record("orders", 0, 0, "a", b'{"n": 1}'), record("orders", 0, 1, "a", b"{bad"),
                 record("orders", 0, 2, "a", b'{"n": 2}')]
        worker.process_chunk(chunk)  # type: ignore[arg-type]
        worker.settle(block=True)
        assert SEEN == [("orders", "a", 1), ("orders", "a", 2)]
        assert [f.offset for f in driver.dead_letters] == [1]
        assert stored(driver)["0_0"] == ({'"a"': 3}, {("orders", 0): 3})


def test_only_a_codec_with_loads_many_decodes_a_batch_at_once() -> None:
    """``json`` (orjson) decodes a batch at once and raises on what orjson refuses (its
    one-by-one decoder reads that with the standard library); ``str`` has no
    ``loads_many``: its topics' records are decoded one by one."""
    decode_all = batch_decoder("json", "orders")
    assert decode_all is not None
    assert decode_all([b'{"n": 1}', b"[2]"]) == [{"n": 1}, [2]]
    for bad in ([b"NaN"], [b"{bad"]):
        with pytest.raises(ValueError):
            decode_all(bad)
    assert orders.decode_value(b"NaN") != orders.decode_value(b"NaN")  # read one by one
    assert batch_decoder("str", "orders") is None


def test_every_record_of_a_source_carries_the_one_key_of_its_source() -> None:
    """``sources_of`` gives each record its source's process-wide tuple (``source_key``),
    for a chunk of one topic and of several alike: dicts keyed by sources find them by
    identity."""
    from shardworker.topology import source_key, sources_of

    one = [record("orders", p, o, "a", b"{}") for o in range(2) for p in (1, 0)]
    two = one + [record("refunds", 0, 0, "a", b"{}")]
    for chunk in (one, two):
        sources = sources_of(chunk)
        assert sources == [(r.topic(), r.partition()) for r in chunk]
        assert all(s is source_key(*s) for s in sources)


@pytest.mark.timeout(20)
def test_a_stream_reports_progress_at_the_record_after_each_tick() -> None:
    """The ticker raises the streams' flag once an interval; the next record taken calls
    ``on_progress`` once and lowers it; stop() ends the thread."""
    from shardworker.stream import ProgressTicker

    with driven() as driver:
        worker = driver.worker
        assert worker is not None
        stream = worker.runners[0].stream
        calls: List[int] = []
        stream.on_progress = lambda: calls.append(1)
        ticker = ProgressTicker([stream])
        ticker.INTERVAL = 0.01
        ticker.start()
        try:
            while not stream.progress_due:
                ticker._stopped.wait(0.005)
        finally:
            ticker.stop()
        assert not ticker._thread.is_alive()
        chunk = [record("orders", 0, o, "a", b'{"n": 1}') for o in range(3)]
        worker.process_chunk(chunk)  # type: ignore[arg-type]
        assert calls == [1] and not stream.progress_due
