"""Waiting out an unreachable broker: which errors mean "not reachable" (wait and retry)
rather than "refused" (a real failure), and how a child calls the broker while it is
away without being taken for hung (DESIGN.md, "Processes": an outage is not a crash).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Optional, TypeVar

from confluent_kafka import KafkaError, KafkaException

T = TypeVar("T")


class BrokerUnavailable(RuntimeError):
    """The broker is unreachable (outputs time out, requests fail with transport errors):
    the child exits with :data:`~.protocol.EXIT_BROKER_UNAVAILABLE` and its batch is read
    again."""


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
