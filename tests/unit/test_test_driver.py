"""The agent test driver (``agent.test_context()``, shardworker/testing.py): the worker's
record path over records a test puts, with real tables in a temporary LMDB store and no
broker.  Each scenario runs for an ``async def`` agent and a plain ``def`` agent with the
same test body."""
from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Awaitable, Callable, List

import pytest

import shardworker
from shardworker.tables import NoCurrentRecordError

pytestmark = pytest.mark.timeout(30)

KINDS = ["async", "sync"]


def run(test: Callable[[], Awaitable[None]]) -> None:
    """Runs an async test body (the project has no pytest-asyncio)."""
    asyncio.run(test())


# -- the README's example ------------------------------------------------------------------
def readme_app(kind: str) -> SimpleNamespace:
    """An app like the README's "Testing your agents" example, its agent async or plain."""
    app = shardworker.App("proj", broker="kafka://127.0.0.1:9")
    orders = app.topic("orders", key_serializer="str", value_serializer="json")
    totals = app.topic("totals", key_serializer="str", value_serializer="json")
    counts = app.table("counts", default=int)

    if kind == "async":
        @app.agent(orders, sink=[totals])
        async def count(stream):  # type: ignore[no-untyped-def]
            async for user, order in stream.items():
                counts[user] += order["amount"]
                yield {"user": user, "total": counts[user]}
    else:
        @app.agent(orders, sink=[totals])
        def count(stream):  # type: ignore[no-untyped-def]
            for user, order in stream.items():
                counts[user] += order["amount"]
                yield {"user": user, "total": counts[user]}

    return SimpleNamespace(app=app, count=count, counts=counts)


def readme_blocks() -> List[str]:
    """The python blocks of the README's "Testing your agents" section (app, test)."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text.split("## Testing your agents", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("kind", KINDS)
def test_the_readme_example_as_written(kind: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's app and test, as files, run as they are (the graph reads the agent's
    source, so they are modules, not exec'd strings); for ``sync`` the agent is made a
    plain ``def`` (``async def`` → ``def``, ``async for`` → ``for``) and the test is
    unchanged."""
    app_block, test_block = readme_blocks()
    if kind == "sync":
        app_block = app_block.replace("async def", "def").replace("async for", "for")
    (tmp_path / "proj.py").write_text(
        'import shardworker\napp = shardworker.App("proj", broker="kafka://127.0.0.1:9")\n'
        + app_block)
    (tmp_path / "test_proj.py").write_text(test_block)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import test_proj  # type: ignore[import-not-found]

        assert sys.modules["proj"].count.is_async is (kind == "async")
        test_proj.test_count()
    finally:
        for name in ("proj", "test_proj"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_keep_their_order_and_go_to_every_sink_decoded(kind: str) -> None:
    proj = readme_app(kind)

    async def body() -> None:
        async with proj.count.test_context() as agent:
            for n in range(20):
                await agent.put({"amount": 1}, key=f"u{n % 3}")
            assert [r["total"] for r in agent.results] == [n // 3 + 1 for n in range(20)]
            assert [(o.topic, o.key, o.value) for o in agent.outputs] == [
                ("totals", r["user"], r) for r in agent.results]
            assert [proj.counts[f"u{i}"] for i in range(3)] == [7, 7, 6]

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_plain_with_runs_it_without_an_event_loop(kind: str) -> None:
    proj = readme_app(kind)
    with proj.count.test_context() as agent:
        agent.put({"amount": 2}, key="u1")
        assert proj.counts["u1"] == 2 and agent.results == [{"user": "u1", "total": 2}]
        # the test body may write a table too: the next record sees it
        proj.counts["u1"] = 40
        agent.put({"amount": 2}, key="u1")
        assert agent.results[-1] == {"user": "u1", "total": 42}


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_context_starts_from_empty_tables(kind: str) -> None:
    proj = readme_app(kind)
    with proj.count.test_context() as agent:
        agent.put({"amount": 2}, key="u1")
    with pytest.raises(NoCurrentRecordError):
        proj.counts["u1"]  # outside a context there is no task to read
    with proj.count.test_context() as agent:
        assert proj.counts["u1"] == 0  # readable before the first put: partition 0's task
        event = agent.put({"amount": 5}, key="u1")
        assert proj.counts["u1"] == 5 and event.offset == 0


@pytest.mark.parametrize("kind", KINDS)
def test_the_test_body_may_write_a_table_before_the_first_put(kind: str) -> None:
    proj = readme_app(kind)
    with proj.count.test_context() as agent:
        proj.counts["u1"] = 40  # partition 0's task, as a read before the first put
        proj.counts["seed"] = 7  # a key no record writes: drained as the test's own write
        agent.put({"amount": 2}, key="u1")
        assert agent.results == [{"user": "u1", "total": 42}] and proj.counts["seed"] == 7


@pytest.mark.parametrize("kind", KINDS)
def test_each_partition_is_a_task_of_its_own(kind: str) -> None:
    proj = readme_app(kind)
    with proj.count.test_context() as agent:
        agent.put({"amount": 1}, key="u1", partition=0)
        agent.put({"amount": 10}, key="u1", partition=1)
        assert proj.counts["u1"] == 10  # the tables of the last record's task
        agent.put({"amount": 1}, key="u1", partition=0)
        assert proj.counts["u1"] == 2
        assert [r["total"] for r in agent.results] == [1, 10, 2]


def test_only_one_context_runs_at_a_time() -> None:
    proj = readme_app("sync")
    with proj.count.test_context():
        with pytest.raises(RuntimeError, match="one at a time"):
            with proj.count.test_context():
                pass
    with proj.count.test_context() as agent:  # the first one's exit freed it
        agent.put({"amount": 1}, key="u1")


# -- bad records -------------------------------------------------------------------------
def failing_app(kind: str, on_error: str) -> SimpleNamespace:
    """An agent that counts, then raises on values with ``"fail"`` (its writes taken back)."""
    app = shardworker.App("bad", broker="kafka://127.0.0.1:9")
    orders = app.topic("orders", key_serializer="str", value_serializer="json")
    out = app.topic("out")
    counts = app.table("counts", default=int)

    if kind == "async":
        @app.agent(orders, sink=[out], on_error=on_error)
        async def tally(stream):  # type: ignore[no-untyped-def]
            async for key, order in stream.items():
                counts[key] += 1
                if order.get("fail"):
                    raise ValueError("refused")
                yield counts[key]
    else:
        @app.agent(orders, sink=[out], on_error=on_error)
        def tally(stream):  # type: ignore[no-untyped-def]
            for key, order in stream.items():
                counts[key] += 1
                if order.get("fail"):
                    raise ValueError("refused")
                yield counts[key]

    return SimpleNamespace(app=app, tally=tally, counts=counts)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_records_are_dead_lettered_and_their_writes_taken_back(kind: str) -> None:
    bad = failing_app(kind, "dlq")

    async def body() -> None:
        async with bad.tally.test_context() as agent:
            await agent.put({}, key="k")
            await agent.put_raw(b"{not json", key=b"k")                # cannot be decoded
            await agent.put({"fail": True}, key="k")                   # the agent raises
            await agent.put({}, key="k")                               # it goes on
            assert agent.results == [1, 2] and bad.counts["k"] == 2
            first, second = agent.dead_letters
            assert (first.offset, first.value, type(first.error)) == (
                1, b"{not json", json.JSONDecodeError)
            assert (second.offset, second.key, str(second.error)) == (2, b'k', "refused")
            assert second.headers["shardsup.error"] == b"ValueError: refused"
            assert second.headers["shardsup.offset"] == b"2"
            assert [(o.key, o.value) for o in agent.outputs] == [(b"k", 1), (b"k", 2)]

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_skip_drops_and_crash_raises_out_of_put(kind: str) -> None:
    skipping = failing_app(kind, "skip")
    with skipping.tally.test_context() as agent:
        agent.put({"fail": True}, key="k")
        agent.put({}, key="k")
        assert agent.dead_letters == [] and [f.offset for f in agent.skipped] == [0]
        assert agent.results == [1]
    crashing = failing_app(kind, "crash")

    async def body() -> None:
        async with crashing.tally.test_context() as agent:
            await agent.put({}, key="k")
            with pytest.raises(ValueError, match="refused"):
                await agent.put({"fail": True}, key="k")
            with pytest.raises(RuntimeError, match="start a new test context"):
                await agent.put({}, key="k")
            assert crashing.counts["k"] == 1 and agent.dead_letters == []

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_an_output_over_message_max_bytes_is_dead_lettered(kind: str) -> None:
    app = shardworker.App("big", broker="kafka://127.0.0.1:9",
                          kafka_config={"message.max.bytes": 2000})
    source, out = app.topic("in"), app.topic("out", value_serializer="str")

    if kind == "async":
        @app.agent(source, sink=[out])
        async def grow(stream):  # type: ignore[no-untyped-def]
            async for n in stream:
                yield "x" * n
    else:
        @app.agent(source, sink=[out])
        def grow(stream):  # type: ignore[no-untyped-def]
            for n in stream:
                yield "x" * n

    with grow.test_context() as agent:
        agent.put(10)
        agent.put(5000)
        assert [len(o.value) for o in agent.outputs] == [10]
        [letter] = agent.dead_letters
        assert letter.headers["shardsup.error"].startswith(b"RecordTooLarge")


# -- windows -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_tumbling_window_follows_the_timestamps_put(kind: str) -> None:
    app = shardworker.App("win", broker="kafka://127.0.0.1:9")
    clicks = app.topic("clicks", key_serializer="str", value_serializer="json")
    per_minute = app.table("per_minute", default=int).tumbling(60.0, expires=120.0)

    if kind == "async":
        @app.agent(clicks)
        async def tally(stream):  # type: ignore[no-untyped-def]
            async for page, n in stream.items():
                per_minute[page] += n
                yield per_minute[page].current()
    else:
        @app.agent(clicks)
        def tally(stream):  # type: ignore[no-untyped-def]
            for page, n in stream.items():
                per_minute[page] += n
                yield per_minute[page].current()

    async def body() -> None:
        async with tally.test_context() as agent:
            t0 = 1_700_000_040.0  # a minute's start (epoch seconds)
            for offset, n in [(0, 1), (30, 2), (59.9, 3), (60, 10), (125, 100)]:
                await agent.put(n, key="home", timestamp=t0 + offset)
            assert agent.results == [1, 3, 6, 10, 100]
            # the test body reads relative to the last record's timestamp (t0 + 125)
            assert per_minute["home"].current() == 100
            assert per_minute["home"].delta(65) == 10
            # [t0, t0 + 60) ended 65 s before stream time: still kept; one later, gone
            assert per_minute["home"].delta(125) == 6
            await agent.put(0, key="home", timestamp=t0 + 181)
            assert per_minute["home"].delta(181) == 0

    run(body)


# -- the stream graph ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_group_by_runs_the_loop_with_the_new_key(kind: str) -> None:
    app = shardworker.App("rk", broker="kafka://127.0.0.1:9")
    orders = app.topic("orders", partitions=4, value_serializer="json")
    per_user = app.table("per_user", default=int)

    if kind == "async":
        @app.agent(orders)
        async def spend(stream):  # type: ignore[no-untyped-def]
            async for user, order in stream.group_by(lambda o: o["user"], name="by-user",
                                                     key_serializer="str").items():
                per_user[user] += order["amount"]
                yield (user, per_user[user])
    else:
        @app.agent(orders)
        def spend(stream):  # type: ignore[no-untyped-def]
            for user, order in stream.group_by(lambda o: o["user"], name="by-user",
                                               key_serializer="str").items():
                per_user[user] += order["amount"]
                yield (user, per_user[user])

    with spend.test_context() as agent:
        for n, (order_id, user) in enumerate([(b"o1", "ann"), (b"o2", "bob"), (b"o3", "ann")]):
            agent.put({"user": user, "amount": n + 1}, key=order_id, partition=n % 4)
        assert agent.results == [("ann", 1), ("bob", 2), ("ann", 4)]
        assert per_user["ann"] == 4  # the task of the last record: ann's partition
        agent.put({"amount": 1}, key=b"o4")  # no "user": the key function raises
        assert str(agent.dead_letters[0].error) == "'user'"


@pytest.mark.parametrize("kind", KINDS)
def test_what_the_agent_sends_is_collected(kind: str) -> None:
    app = shardworker.App("wc", broker="kafka://127.0.0.1:9")
    lines = app.topic("lines", value_serializer="str")
    words = app.topic("words", key_serializer="str", value_serializer="json")

    if kind == "async":
        @app.agent(lines)
        async def split(stream):  # type: ignore[no-untyped-def]
            async for line in stream:
                for word in line.split():
                    await words.send(key=word, value=1)
    else:
        @app.agent(lines)
        def split(stream):  # type: ignore[no-untyped-def]
            for line in stream:
                for word in line.split():
                    words.send_soon(key=word, value=1)

    with split.test_context() as agent:
        agent.put("to be or not")
        assert [(s.topic, s.key, s.value) for s in agent.sent] == [
            ("words", w, 1) for w in ["to", "be", "or", "not"]]
    assert app._producer is None  # the app's own producer is left as it was


@pytest.mark.parametrize("kind", KINDS)
def test_a_global_table_is_set_by_the_test(kind: str) -> None:
    app = shardworker.App("gt", broker="kafka://127.0.0.1:9")
    countries = app.global_table(
        "countries", topic=app.topic("countries", key_serializer="str"))
    orders = app.topic("orders", key_serializer="str")

    if kind == "async":
        @app.agent(orders)
        async def enrich(stream):  # type: ignore[no-untyped-def]
            async for order in stream:
                yield countries.get(order["country"])
    else:
        @app.agent(orders)
        def enrich(stream):  # type: ignore[no-untyped-def]
            for order in stream:
                yield countries.get(order["country"])

    async def body() -> None:
        async with enrich.test_context() as agent:
            await agent.set_global(countries, "DE", {"name": "Germany"})
            await agent.put({"country": "DE"})
            await agent.put({"country": "FR"})
            assert agent.results == [{"name": "Germany"}, None]

    run(body)
    assert not countries.is_open


def test_an_async_agent_runs_on_a_loop_of_its_own_and_put_waits_for_it() -> None:
    """``await agent.put`` inside the test's event loop: the agent runs on the driver's
    thread and loop (as in a child), and put returns once the record is processed."""
    app = shardworker.App("loops", broker="kafka://127.0.0.1:9")
    ticks = app.topic("ticks")
    seen = []

    @app.agent(ticks)
    async def slow(stream):  # type: ignore[no-untyped-def]
        async for n in stream:
            await asyncio.sleep(0.01)
            seen.append((n, threading.current_thread(), asyncio.get_running_loop()))

    async def body() -> None:
        async with slow.test_context() as agent:
            event = await agent.put(1, timestamp=1_700_000_000.5)
            assert event.timestamp == 1_700_000_000.5 and len(seen) == 1
            n, thread, loop = seen[0]
            assert thread is not threading.current_thread()
            assert loop is not asyncio.get_running_loop()

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_an_agent_that_fails_before_its_first_record_fails_the_context(kind: str) -> None:
    app = shardworker.App("broken", broker="kafka://127.0.0.1:9")
    source = app.topic("in")

    if kind == "async":
        @app.agent(source)
        async def broken(stream):  # type: ignore[no-untyped-def]
            raise KeyError("set-up")
    else:
        @app.agent(source)
        def broken(stream):  # type: ignore[no-untyped-def]
            raise KeyError("set-up")

    with pytest.raises(RuntimeError, match="failed before its first record"):
        with broken.test_context():
            pass  # pragma: no cover
    with readme_app(kind).count.test_context():  # nothing was left running
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_items_decode_every_key_with_its_codec_a_missing_key_to_none(kind: str) -> None:
    """``stream.items()`` decodes a ``str`` key with ``bytes.decode`` (the codec's
    ``loads_present``) and a missing one with the codec's own decoder (None); a ``json``
    key, whose codec has no ``loads_present``, with its decoder."""
    app = shardworker.App("keys", broker="kafka://127.0.0.1:9")
    named = app.topic("named", key_serializer="str")
    shaped = app.topic("shaped", key_serializer="json")
    seen: List[object] = []
    if kind == "async":
        @app.agent(shaped)
        async def pairs(stream):  # type: ignore[no-untyped-def]
            async for key, _value in stream.items():
                seen.append(key)

        @app.agent(named)
        async def one(stream):  # type: ignore[no-untyped-def]
            async for key, _value in stream.items():
                seen.append(("one", key))
    else:
        @app.agent(shaped)
        def pairs(stream):  # type: ignore[no-untyped-def]
            for key, _value in stream.items():
                seen.append(key)

        @app.agent(named)
        def one(stream):  # type: ignore[no-untyped-def]
            for key, _value in stream.items():
                seen.append(("one", key))

    async def body() -> None:
        async with one.test_context() as agent:
            await agent.put_raw(b"1", key="é".encode())
            await agent.put_raw(b"2", key=None)
        async with pairs.test_context() as agent:
            await agent.put_raw(b"3", key=b"[1, 2]", topic=shaped)
            await agent.put_raw(b"4", key=None, topic=shaped)

    run(body)
    assert seen == [("one", "é"), ("one", None), [1, 2], None]


@pytest.mark.parametrize("kind", KINDS)
def test_a_key_codec_that_refuses_a_key_is_asked_once(kind: str) -> None:
    """A key codec's TypeError fails the record (dead-lettered) after one call: the
    fallback for None keys is only for a codec with a faster decoder of its own."""
    calls: List[bytes] = []

    def refuse(data: bytes) -> str:
        calls.append(data)
        raise TypeError("not a key of ours")

    app = shardworker.App("refusing", broker="kafka://127.0.0.1:9")
    codec = shardworker.codecs.FunctionCodec("refusing", str.encode, refuse)  # type: ignore[arg-type]
    refused = app.topic("refused", key_serializer=codec)
    if kind == "async":
        @app.agent(refused, on_error="dlq")
        async def keyed(stream):  # type: ignore[no-untyped-def]
            async for _key, _value in stream.items():
                pass
    else:
        @app.agent(refused, on_error="dlq")
        def keyed(stream):  # type: ignore[no-untyped-def]
            for _key, _value in stream.items():
                pass

    async def body() -> None:
        async with keyed.test_context() as agent:
            await agent.put_raw(b"1", key=b"k")
            assert [type(f.error) for f in agent.dead_letters] == [TypeError]

    run(body)
    assert calls == [b"k", b"k"]  # the agent's stream once, and put's Event (_put) once
