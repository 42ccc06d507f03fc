"""Framed messages between the supervisor and a child over one socketpair.

A frame is a 4-byte big-endian length followed by a UTF-8 JSON object with an ``op`` key.
Supervisor → child: ``assign``, ``revoke``, ``stop``, ``group``, ``timers`` (``run``: this
child runs the app's timers, or stops running them).  Child → supervisor: ``ready``,
``offsets`` (processed-up-to, i.e. the next offset to read), ``revoked``, ``stats``,
``failed`` (``error``; ``broker_unavailable`` when the broker, not the agent, stopped
it).  Messages are small and rare (a few per second), so JSON is plenty.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Dict, List, Optional, TypeVar

from confluent_kafka import KafkaError, KafkaException

T = TypeVar("T")

_HEADER = struct.Struct(">I")

#: A child's exit code when it stopped because the broker could not be reached: the
#: supervisor restarts it (with a backoff) without counting a crash toward FAILED, since
#: crash backoff is for the agent's own code (DESIGN.md, "Processes").  75 is EX_TEMPFAIL.
EXIT_BROKER_UNAVAILABLE = 75


class BrokerUnavailable(RuntimeError):
    """The broker is unreachable (outputs time out, requests fail with transport errors):
    the child exits with :data:`EXIT_BROKER_UNAVAILABLE` and its batch is read again."""


#: errors that say the broker (or the partition's leader) could not be reached in time,
#: not that it refused what was sent: waiting and retrying is the answer to them
UNREACHABLE_CODES = frozenset([
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE, KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION, KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
])
_UNREACHABLE_TEXTS = tuple(KafkaError(code).str() for code in UNREACHABLE_CODES)


def broker_unreachable(error: KafkaError) -> bool:
    """True for an error of an unreachable or moving broker (see :data:`UNREACHABLE_CODES`)
    or one librdkafka itself marks retriable; False for a refusal (too large, not
    authorized, fenced, ...), which is a real failure."""
    return error.code() in UNREACHABLE_CODES or bool(error.retriable())


#: seconds between two heartbeats of a child waiting on a call to the broker: well inside
#: the supervisor's ``--child-timeout`` (a child that sends nothing for that long is taken
#: for hung and killed, a counted crash)
BROKER_SLICE = 1.0
#: the timeout given to each of those calls; librdkafka may block past it (a request in
#: flight waits for ``socket.timeout.ms``), so the call runs in a thread of its own and
#: the child heartbeats while it waits
BROKER_CALL_TIMEOUT = 5.0
#: seconds a child waits out an unreachable broker in one call before it gives up with
#: :class:`BrokerUnavailable` (exit 75, restarted without counting a crash)
BROKER_WAIT = 60.0


def _start(call: Callable[[float], T], timeout: float) -> "Future[T]":
    """``call(timeout)`` in a daemon thread of its own; its outcome in the future."""
    future: "Future[T]" = Future()

    def run() -> None:
        try:
            future.set_result(call(timeout))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            future.set_exception(exc)

    threading.Thread(target=run, name="broker-call", daemon=True).start()
    return future


def call_while_unreachable(call: Callable[[float], T], heartbeat: Callable[[], None],
                           what: str, limit: Optional[float] = None) -> T:
    """``call(timeout)``, made again for as long as it fails because the broker cannot be
    reached (:func:`broker_unreachable`), at most ``limit`` seconds (default
    :data:`BROKER_WAIT`); then :class:`BrokerUnavailable`.  Each call runs in a thread
    and ``heartbeat()`` is called every :data:`BROKER_SLICE` seconds while it runs, so
    the child's heartbeat goes on however long librdkafka blocks.  Any other error (a
    refusal, a fatal error, a transaction that must be aborted) is raised at once.  For
    librdkafka's blocking calls that may be called again after a timeout
    (``init_transactions``, ``send_offsets_to_transaction``, ``commit_transaction``,
    ``abort_transaction``, ``Consumer.committed``; DESIGN.md, "Processes").  A call still
    running at the bound is left to its thread (the child is about to exit)."""
    limit = BROKER_WAIT if limit is None else limit
    deadline = time.monotonic() + limit
    while True:
        future = _start(call, min(BROKER_CALL_TIMEOUT, max(limit, BROKER_SLICE)))
        while True:
            try:
                return future.result(timeout=BROKER_SLICE)
            except FutureTimeout:
                pass
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if (not isinstance(error, KafkaError) or error.fatal()
                        or error.txn_requires_abort() or not broker_unreachable(error)):
                    raise
                break  # timed out in librdkafka: heartbeat, and call again
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(f"{what}: no answer from the broker in {limit:.0f}s")
            heartbeat()
        if time.monotonic() >= deadline:
            raise BrokerUnavailable(f"{what}: no answer from the broker in {limit:.0f}s "
                                    f"({error.str()})")
        heartbeat()


def says_broker_unreachable(text: str) -> bool:
    """The same test for an error kept as text (``"<topic>: <error.str()>"``)."""
    return text.endswith(_UNREACHABLE_TEXTS)


class ChannelClosed(EOFError):
    """The other end of the channel has gone (process exited or was killed)."""


class Channel:
    """One end of a supervisor↔child socketpair; reads never block."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self._inbox = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: str, **fields: Any) -> None:
        """Writes one message; blocks only while the peer's socket buffer is full."""
        body = json.dumps({"op": op, **fields}, separators=(",", ":")).encode()
        data = _HEADER.pack(len(body)) + body
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        finally:
            self.sock.setblocking(False)

    def receive(self) -> List[Dict[str, Any]]:
        """Every complete message that has arrived so far (possibly none)."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            if not chunk:
                if self._inbox:
                    break  # hand out what is complete; EOF is reported on the next call
                raise ChannelClosed("peer closed the channel")
            self._inbox += chunk
        messages = []
        while len(self._inbox) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._inbox)
            if len(self._inbox) < _HEADER.size + size:
                break
            body = bytes(self._inbox[_HEADER.size:_HEADER.size + size])
            del self._inbox[:_HEADER.size + size]
            messages.append(json.loads(body))
        return messages

    def close(self) -> None:
        self.sock.close()
