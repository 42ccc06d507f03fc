"""A failed record, told and kept: one log line per failure, and the dead letter that
carries the record with its error to ``<app>-<agent>-dlq`` (DESIGN.md, "Bad input and
errors")."""
from __future__ import annotations

import logging
import traceback
from typing import TYPE_CHECKING

from .origins import HDR_ORIGIN
from .produce import RecordTooLarge, fit_dead_letter, produce

if TYPE_CHECKING:  # pragma: no cover
    from confluent_kafka import Message, Producer

    from .app import Agent

# the lines keep the logger name they were always logged under
log = logging.getLogger("shardworker.worker")


def log_failure(agent: "Agent", msg: "Message", exc: BaseException) -> None:
    """One line per failed record: where, what, and what its policy does with it."""
    where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
    if agent.on_error == "crash":
        log.error("agent %s failed on %s: %r; stopping the child", agent.name, where, exc)
        return
    log.error("agent %s failed on %s: %s: %s (%s)", agent.name, where, type(exc).__name__,
              exc, "dead-lettered to " + agent.dlq_topic if agent.on_error == "dlq" else "skipped")


def dead_letter(producer: "Producer", agent: "Agent", msg: "Message", exc: BaseException,
                max_message_bytes: int) -> None:
    """Sends ``msg`` to the agent's dead-letter topic with the error in its headers, on
    ``producer`` (the record's: exactly-once, its task's transaction).  A dead letter too
    large for ``message.max.bytes`` goes with its payload truncated (header
    ``shardsup.truncated``: the original length); one that cannot fit even then (a huge
    key) is logged and dropped: never a crash loop."""
    # the record's own origin stays behind: a dead letter is not a send of its upstream
    headers = [h for h in msg.headers() or () if h[0] != HDR_ORIGIN] + [
        ("shardsup.error", f"{type(exc).__name__}: {exc}".encode()[:4000]),
        ("shardsup.traceback", "".join(traceback.format_exception(
            type(exc), exc, exc.__traceback__)).encode()[-8000:]),
        ("shardsup.agent", agent.name.encode()),
        ("shardsup.topic", msg.topic().encode()),
        ("shardsup.partition", str(msg.partition()).encode()),
        ("shardsup.offset", str(msg.offset()).encode()),
    ]
    try:
        produce(producer, agent.dlq_topic, msg.value(), msg.key(), headers)
        return
    except RecordTooLarge:
        value, headers = fit_dead_letter(msg.value(), msg.key(), headers, max_message_bytes)
    try:
        produce(producer, agent.dlq_topic, value, msg.key(), headers)
    except RecordTooLarge as exc2:
        log.error("dead letter of %s[%d]@%d dropped: %s", msg.topic(), msg.partition(),
                  msg.offset(), exc2)
