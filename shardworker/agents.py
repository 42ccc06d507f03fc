"""Runs agents over the batches the worker hands them.

An async agent runs as one asyncio task for the life of the child; a plain ``def`` agent
runs in its own thread, so it never touches asyncio.  Either way the agent pulls records
from its :class:`~shardworker.stream.Stream`; the worker fills the stream's buffer and
waits in :meth:`drain` until the agent has taken every record and asks for more.  The
hand-over costs a few microseconds per *batch*, nothing per record.
"""
from __future__ import annotations

import asyncio
import inspect
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from .stream import Stream, StreamStopped

if TYPE_CHECKING:  # pragma: no cover
    from confluent_kafka import Message

    from .app import Agent

#: called with (agent, record in hand, value the agent yielded)
Emit = Callable[["Agent", "Message", Any], None]
#: called with (agent, record in hand or None, exception); raises to stop the child
OnError = Callable[["Agent", Optional["Message"], BaseException], None]


class AgentRunner:
    """What the worker needs of a running agent."""

    def __init__(self, agent: "Agent", emit: Emit, on_error: OnError) -> None:
        self.agent = agent
        self.stream = Stream(agent)
        self.emit = emit
        self.on_error = on_error
        self.stopping = False
        #: an exception that must stop the child (policy ``crash``, or a broken agent)
        self.fatal: Optional[BaseException] = None

    def start(self) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        """Returns when the agent has processed every record in its stream's buffer."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _handle(self, exc: BaseException) -> bool:
        """Applies the error policy; True when the agent should be started again."""
        if isinstance(exc, StreamStopped) or self.stopping:
            return False
        try:
            if self.stream.current is None:
                raise RuntimeError(f"agent {self.agent.name} failed before its first record") from exc
            self.on_error(self.agent, self.stream.current, exc)
        except BaseException as fatal:  # noqa: BLE001 - handed to the worker loop
            self.fatal = fatal
            return False
        # the failed record is settled; the agent starts afresh on the records after it
        self.stream.current = None
        return True


class AsyncAgentRunner(AgentRunner):
    """An ``async def`` agent, as one task on the child's event loop."""

    def __init__(self, agent: "Agent", emit: Emit, on_error: OnError,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(agent, emit, on_error)
        self.loop = loop
        self._wakeup: Optional[asyncio.Future] = None
        self._drained: Optional[asyncio.Future] = None
        self.task: Optional[asyncio.Task] = None
        self.stream.wait_async = self._wait_for_batch

    async def _wait_for_batch(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._wakeup = self.loop.create_future()
        await self._wakeup
        if self.stopping:
            raise StreamStopped()

    async def _run(self) -> None:
        while True:
            try:
                result = self.agent.fn(self.stream)
                if inspect.isasyncgen(result):
                    async for out in result:
                        self.emit(self.agent, self.stream.current, out)  # type: ignore[arg-type]
                else:
                    await result
                if self.stopping:
                    return
                raise RuntimeError(f"agent {self.agent.name} returned while its stream runs")
            except BaseException as exc:  # noqa: BLE001 - policy decides
                if isinstance(exc, asyncio.CancelledError) or not self._handle(exc):
                    if self._drained is not None and not self._drained.done():
                        self._drained.set_result(None)
                    return

    def start(self) -> None:
        self.task = self.loop.create_task(self._run())
        self.loop.run_until_complete(asyncio.sleep(0))  # run it up to its first wait

    async def drain_async(self) -> None:
        self._drained = self.loop.create_future()
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)
        await self._drained

    def drain(self) -> None:
        self.loop.run_until_complete(self.drain_async())

    def stop(self) -> None:
        self.stopping = True
        if self.task is not None and not self.task.done():
            if self._wakeup is not None and not self._wakeup.done():
                self._wakeup.set_result(None)
            self.task.cancel()
            try:
                self.loop.run_until_complete(self.task)
            except BaseException:  # noqa: BLE001 - the agent is going away
                pass


class SyncAgentRunner(AgentRunner):
    """A plain ``def`` agent, in a thread of its own: no event loop anywhere near it."""

    def __init__(self, agent: "Agent", emit: Emit, on_error: OnError) -> None:
        super().__init__(agent, emit, on_error)
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self.thread = threading.Thread(target=self._run, name=f"agent-{agent.name}", daemon=True)
        self.stream.wait_sync = self._wait_for_batch

    def _wait_for_batch(self) -> None:
        self._done.release()
        self._go.acquire()
        if self.stopping:
            raise StreamStopped()

    def _run(self) -> None:
        while True:
            try:
                result = self.agent.fn(self.stream)
                if inspect.isgenerator(result):
                    for out in result:
                        self.emit(self.agent, self.stream.current, out)  # type: ignore[arg-type]
                if self.stopping:
                    break
                raise RuntimeError(f"agent {self.agent.name} returned while its stream runs")
            except BaseException as exc:  # noqa: BLE001 - policy decides
                if not self._handle(exc):
                    break
        self._done.release()

    def start(self) -> None:
        self.thread.start()
        self._done.acquire()  # the agent reached its first wait (or died trying)

    def drain(self) -> None:
        self._go.release()
        self._done.acquire()

    def stop(self) -> None:
        self.stopping = True
        if self.thread.is_alive():
            self._go.release()
            self.thread.join(timeout=5)
