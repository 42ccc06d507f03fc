"""An agent test driver: run one agent over records you put, with no broker and no child
process (Faust's ``agent.test_context()``; DESIGN.md, "Testing agents")::

    async with count.test_context() as agent:
        event = await agent.put({"n": 1}, key="k", timestamp=60.0)
        assert counts["k"] == 1                 # the tables, as the agent left them
        assert agent.results == [...]           # what it yielded, in order
        assert agent.dead_letters == []         # what its error policy dead-lettered

What runs is the worker's own record path, not a copy of it: a
:class:`~shardworker.worker.Worker` (decode, forward, emit, the error policy, drain,
settle) with the agent started by the same runner the worker uses (an ``async def`` agent
on an event loop, a plain ``def`` one in a thread of its own), real tables over a fresh
LMDB store per task in a temporary directory, and the at-least-once committer.  Only the
edges are stand-ins: records come from :meth:`TestAgent.put` instead of a consumer, and
what would go to the broker is collected by a :class:`CollectingProducer` that
acknowledges everything at once.  Every put is one batch: its table writes are committed
to LMDB (and the changelog records "acknowledged") before it returns.

The worker runs in a thread of the driver's own (its event loop, when the agent is
async, is that thread's), so ``await agent.put(...)`` works inside a running event loop,
and ``with agent.test_context() as agent: agent.put(...)`` works without one.

This module holds what a test calls; what runs in the driver's thread is
:mod:`shardworker.agentdriver`, and the stand-ins for Kafka are
:mod:`shardworker.localkafka`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from .agentdriver import AgentDriver, Failure, Output
from .localkafka import CollectingProducer, Headers
from .stream import Event

if TYPE_CHECKING:  # pragma: no cover
    from .app import Agent, Topic

__all__ = ["AgentTestContext", "TestAgent", "SyncTestAgent", "Output", "Failure",
           "CollectingProducer"]

_ACTIVE = threading.Lock()


class AgentTestContext(AgentDriver):
    """``agent.test_context()``: an (async) context manager that runs ``agent`` alone,
    over records put by the test, with fresh tables (see the module docstring).

    ``async with`` gives a :class:`TestAgent` (``await agent.put(...)``), ``with`` a
    :class:`SyncTestAgent` (``agent.put(...)``); both read the same results.  One test
    context runs at a time in a process (tables have one current record)."""

    def __init__(self, agent: "Agent") -> None:
        super().__init__(agent)
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # -- entering and leaving ------------------------------------------------------------
    def __enter__(self) -> "SyncTestAgent":
        self._start()
        return SyncTestAgent(self)

    def __exit__(self, *exc: Any) -> None:
        self._stop()

    async def __aenter__(self) -> "TestAgent":
        self._start()
        return TestAgent(self)

    async def __aexit__(self, *exc: Any) -> None:
        self._stop()

    def _start(self) -> None:
        if not _ACTIVE.acquire(blocking=False):
            raise RuntimeError("another agent test context is running in this process: "
                               "tables have one current record, so they run one at a time")
        try:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"test-{self.agent.name}")
            self._datadir = tempfile.mkdtemp(prefix=f"shardsup-test-{self.agent.name}-")
            self._call(self._setup)
        except BaseException:
            self._stop()
            raise

    def _stop(self) -> None:
        try:
            if self._executor is not None:
                self._call(self._teardown)
                self._executor.shutdown(wait=True)
        finally:
            self._executor = None
            if self._datadir is not None:
                shutil.rmtree(self._datadir, ignore_errors=True)
                self._datadir = None
            if _ACTIVE.locked():
                _ACTIVE.release()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._executor is not None, "the test context is not running"
        return self._executor.submit(fn, *args).result()

    def _submit(self, fn: Callable[..., Any], *args: Any) -> "concurrent.futures.Future[Any]":
        if self._executor is None:
            raise RuntimeError("the agent's test context is not running (use it inside "
                               "`async with agent.test_context() as agent:`)")
        return self._executor.submit(fn, *args)


class _TestAgentBase:
    """What both views of a running test context read."""

    def __init__(self, context: AgentTestContext) -> None:
        self.context = context

    @property
    def agent(self) -> "Agent":
        return self.context.agent

    @property
    def results(self) -> List[Any]:
        """What the agent yielded, in order: the values themselves, one per ``yield``
        (each went to every sink; see :attr:`outputs`)."""
        return self.context.results

    @property
    def outputs(self) -> List[Output]:
        """The records produced to the agent's sinks, in order, decoded."""
        return self.context.outputs

    @property
    def sent(self) -> List[Output]:
        """The records the agent sent with ``topic.send``/``send_soon``, in order."""
        return self.context.sent

    @property
    def dead_letters(self) -> List[Failure]:
        """Records dead-lettered by the agent's error policy (``on_error="dlq"``)."""
        return self.context.dead_letters

    @property
    def skipped(self) -> List[Failure]:
        """Records dropped by the agent's error policy (``on_error="skip"``)."""
        return self.context.skipped

    def _encode(self, value: Any, key: Any, topic: Any) -> Tuple["Topic", Optional[bytes],
                                                                  Optional[bytes]]:
        source = self._topic(topic)
        return source, source.encode_key(key), source.encode_value(value)

    def _topic(self, topic: Any) -> "Topic":
        agent = self.agent
        if topic is None:
            return agent.topic
        name = topic if isinstance(topic, str) else topic.name
        for candidate in agent.topics:
            if candidate.name == name:
                return candidate
        raise ValueError(f"agent {agent.name} does not read topic {name!r}")


class TestAgent(_TestAgentBase):
    """The running agent of ``async with agent.test_context() as agent``."""

    __test__ = False  # not a pytest test class

    async def put(self, value: Any = None, key: Any = None, *, partition: int = 0,
                  timestamp: Optional[float] = None, headers: Headers = None,
                  topic: Any = None) -> Event:
        """Runs the agent over one record of its topic (``topic=``: another topic it
        reads): ``key`` and ``value`` encoded with the topic's serializers (and decoded
        again by the worker, as in production), at ``partition`` (its task's tables),
        with ``timestamp`` (epoch seconds; default now: windows use it).  Returns when the
        record's outputs are collected and its table writes committed; raises what the
        agent raised under ``on_error="crash"``.  Returns the record as an
        :class:`~shardworker.stream.Event` (``key``, ``value``, ``offset``, ...)."""
        source, kb, vb = self._encode(value, key, topic)
        return await self.put_raw(vb, kb, partition=partition, timestamp=timestamp,
                                  headers=headers, topic=source)

    async def put_raw(self, value: Optional[bytes], key: Optional[bytes] = None, *,
                      partition: int = 0, timestamp: Optional[float] = None,
                      headers: Headers = None, topic: Any = None) -> Event:
        """:meth:`put` with the record's bytes as they are (a value the topic's
        serializer cannot decode, say)."""
        future = self.context._submit(self.context._put, self._topic(topic), partition, key,
                                      value, timestamp, headers)
        return await asyncio.wrap_future(future)

    async def set_global(self, table: Any, key: Any, value: Any) -> None:
        """Puts ``key``'s ``value`` (None deletes it) in a global table's copy, as if its
        topic had it (global tables start empty in a test context)."""
        await asyncio.wrap_future(self.context._submit(self.context._set_global, table, key,
                                                       value))


class SyncTestAgent(_TestAgentBase):
    """The running agent of ``with agent.test_context() as agent`` (no event loop)."""

    def put(self, value: Any = None, key: Any = None, *, partition: int = 0,
            timestamp: Optional[float] = None, headers: Headers = None,
            topic: Any = None) -> Event:
        """:meth:`TestAgent.put`, returning when the record is processed."""
        source, kb, vb = self._encode(value, key, topic)
        return self.put_raw(vb, kb, partition=partition, timestamp=timestamp, headers=headers,
                            topic=source)

    def put_raw(self, value: Optional[bytes], key: Optional[bytes] = None, *,
                partition: int = 0, timestamp: Optional[float] = None,
                headers: Headers = None, topic: Any = None) -> Event:
        """:meth:`TestAgent.put_raw`, returning when the record is processed."""
        return self.context._submit(self.context._put, self._topic(topic), partition, key,
                                    value, timestamp, headers).result()

    def set_global(self, table: Any, key: Any, value: Any) -> None:
        """:meth:`TestAgent.set_global`."""
        self.context._submit(self.context._set_global, table, key, value).result()
