"""One way to put a record on a producer: wait out a full queue, name an oversize record.

Outputs (sink records), changelog records and dead letters all go through
:func:`produce`: a full local queue (``BufferError``) is waited out by serving delivery
reports, never turned into a crash; a record larger than the producer's
``message.max.bytes`` (librdkafka refuses it at ``produce()`` with
``MSG_SIZE_TOO_LARGE``) becomes :class:`RecordTooLarge`, which the worker dead-letters
with the record that produced it (DESIGN.md, "Bad input and errors").
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from confluent_kafka import KafkaError, KafkaException, Producer

#: librdkafka's default ``message.max.bytes``
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
#: seconds one wait for room in a full producer queue serves delivery reports
BACKPRESSURE_POLL = 0.05
#: bytes a record takes beyond key, value and headers in librdkafka's size check (its
#: record overhead, rounded up), so that a truncated dead letter fits for sure
RECORD_OVERHEAD = 512

#: librdkafka's "no partition given": its partitioner picks one from the key
UNASSIGNED = -1

Headers = List[Tuple[str, bytes]]


class RecordTooLarge(ValueError):
    """A record is larger than the producer (or the broker) accepts: the record that
    produced it is dead-lettered instead, and its outputs are not kept."""


def message_max_bytes(config: dict) -> int:
    """The ``message.max.bytes`` a producer made from ``config`` enforces."""
    return int(config.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES))


def is_too_large(error: Optional[KafkaError]) -> bool:
    """True for the error of a record refused for its size, by librdkafka or the broker."""
    return error is not None and error.code() in (KafkaError.MSG_SIZE_TOO_LARGE,
                                                  KafkaError.RECORD_LIST_TOO_LARGE)


def produce(producer: Producer, topic: str, value: Optional[bytes], key: Optional[bytes],
            headers: Optional[Headers] = None,
            on_delivery: Optional[Callable[[Any, Any], None]] = None,
            partition: int = UNASSIGNED, timestamp: int = 0) -> None:
    """Queues one record (``partition``: as the partitioner says unless given;
    ``timestamp``: epoch ms, 0 for now), waiting (serving delivery reports) while the
    local queue is full.  Raises :class:`RecordTooLarge` for a record over
    ``message.max.bytes``; any other refusal propagates as librdkafka raised it."""
    while True:
        try:
            if timestamp:
                producer.produce(topic, value, key, partition=partition, headers=headers,
                                 on_delivery=on_delivery, timestamp=timestamp)
            else:
                producer.produce(topic, value, key, partition=partition, headers=headers,
                                 on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(BACKPRESSURE_POLL)  # queue full: let deliveries drain, then retry
        except KafkaException as exc:
            if is_too_large(exc.args[0]):
                size = len(value or b"") + len(key or b"") + sum(len(v or b"") for _h, v in headers or ())
                raise RecordTooLarge(f"a record of {size} bytes for {topic} is larger than "
                                     f"message.max.bytes: {exc.args[0].str()}") from None
            raise


def fit_dead_letter(value: Optional[bytes], key: Optional[bytes], headers: Headers,
                    limit: int) -> Tuple[Optional[bytes], Headers]:
    """A dead letter cut down to fit ``limit`` bytes: the headers that say what went wrong
    are kept (each long one shortened), the payload is truncated to what room is left,
    and ``shardsup.truncated`` gives the payload's original length."""
    original = len(value or b"")
    room = limit - RECORD_OVERHEAD - len(key or b"")
    kept: Headers = []
    for name, data in headers:
        budget = max(0, room // 4 - len(name))
        data = data if len(data or b"") <= budget else (data or b"")[:budget]
        kept.append((name, data))
        room -= len(name) + len(data or b"")
    kept.append(("shardsup.truncated", str(original).encode()))
    room -= 64
    payload = None if value is None else value[:max(0, room)]
    return payload, kept


def check_fits(topic: str, key: Optional[bytes], value: Optional[bytes], limit: int) -> None:
    """Raises :class:`RecordTooLarge` when a record for ``topic`` could not be produced
    under ``limit`` (``message.max.bytes``), with room for librdkafka's own overhead.
    Tables call it when a value is written, so that a changelog value too large fails the
    record that wrote it (dead-lettered, its writes taken back) instead of the batch."""
    size = len(key or b"") + len(value or b"")
    if size + RECORD_OVERHEAD > limit:
        raise RecordTooLarge(f"a record of {size} bytes for {topic} is larger than "
                             f"message.max.bytes ({limit}) allows")
