"""Where a consumer is told to start a partition that it reads from the beginning: the
worker's (a partition with no committed offset), its restore consumer's (a changelog) and
the global tables' mirror's (a topic it has no copy of yet) (DESIGN.md, "Tests and the
broker").

A partition with no committed offset starts at its beginning (``OFFSET_BEGINNING``, the
supervisor's answer under ``auto_offset_reset="earliest"``).  librdkafka turns that into
a ListOffsets(earliest) request, and the test broker (tansu) answers it with the offset of
the record batch it *stored* first in wall-clock time, not the lowest one: when two
producers wrote a partition's first batches at the same moment, a task restarted on it
would skip the batch that took longer to store.  So the consumer is given offset 0
instead.  On Kafka, where retention may have deleted offset 0, that fetch is out of range
and ``auto.offset.reset`` (``earliest``: the only policy that asks for the beginning; the
restore consumer and the mirror set it whatever the app's) finds the log start with the
same ListOffsets request as before.
"""
from __future__ import annotations

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

__all__ = ["assignable"]


def assignable(topic: str, partition: int, offset: int) -> TopicPartition:
    """The ``TopicPartition`` to assign for reading ``topic[partition]`` from ``offset``
    (``OFFSET_BEGINNING`` becomes 0; any other offset is kept)."""
    return TopicPartition(topic, partition, 0 if offset == OFFSET_BEGINNING else offset)
