"""The changelog record format: what a table's changelog record carries, how its headers
are written and read, and how a drained batch's records are produced.

Each table has a compacted topic ``<app>-<table>-changelog``; a task writes the partition
of its own number, whatever key it writes.  A record's key and value are the table's
stored key and value bytes (the whole value, never a delta; None: a tombstone, the key
was deleted or its window expired).  Its headers (ASCII decimal values) say which batch
wrote it (DESIGN.md, "State (LMDB)", "Changelog"):

==============================  =========================================================
:data:`HDR_SRC_TOPIC`           the source topic of the record that wrote the key
:data:`HDR_SRC_PARTITION`       its partition
:data:`HDR_SRC_OFFSET`          the LAST offset of that partition in the batch: restore
                                applies the record only when its whole batch is committed
:data:`HDR_SRC_CONFIRMED`       the partition's next offset that was durable everywhere
                                when the batch was drained ("Offsets gone")
:data:`HDR_STREAM_TIME`         the task's stream time after the batch (absent when the
                                task has none yet)
==============================  =========================================================
"""
from __future__ import annotations

from typing import (TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Tuple)

from .produce import produce

if TYPE_CHECKING:
    from confluent_kafka import Message, Producer

    from .batchend import DrainedBatch

__all__ = ["HDR_SRC_TOPIC", "HDR_SRC_PARTITION", "HDR_SRC_OFFSET", "HDR_SRC_CONFIRMED",
           "HDR_STREAM_TIME", "ChangelogRecord", "batch_headers", "source_of", "confirmed_of",
           "produce_batch"]

#: changelog record headers: where the batch that wrote the record came from
HDR_SRC_TOPIC = "shardsup.src.topic"
HDR_SRC_PARTITION = "shardsup.src.partition"
#: the last offset of that source partition in the batch (ASCII decimal)
HDR_SRC_OFFSET = "shardsup.src.offset"
#: the task's stream time after the batch (epoch ms, ASCII decimal): restored with the
#: state, so windows expired before a failover stay expired (DESIGN.md, "State (LMDB)")
HDR_STREAM_TIME = "shardsup.stream.time"
#: the source partition's next offset whose effects were durable everywhere (LMDB, and so
#: every changelog record and output acknowledged, or under exactly-once committed) when
#: the batch was drained: with the group's offsets gone, restore stops there, never past a
#: batch that reached only some changelogs (DESIGN.md, "State (LMDB)", "Offsets gone")
HDR_SRC_CONFIRMED = "shardsup.src.confirmed"

TP = Tuple[str, int]
Headers = List[Tuple[str, bytes]]


class ChangelogRecord(NamedTuple):
    """One record the worker produces to a changelog topic before committing LMDB."""

    table: str
    topic: str
    partition: int
    key: bytes
    value: Optional[bytes]       #: None: a tombstone (key deleted or window expired)
    headers: Headers


# -- writing -----------------------------------------------------------------------------
def batch_headers(tp: TP, last_offset: int, confirmed: int, stream_time: Optional[int]) -> Headers:
    """The headers of every changelog record that source partition ``tp`` wrote in one
    batch: ``last_offset`` is the partition's last offset in the batch, ``confirmed`` its
    stored (durable) next offset, ``stream_time`` the task's (None: not yet known)."""
    headers = [(HDR_SRC_TOPIC, tp[0].encode()),
               (HDR_SRC_PARTITION, b"%d" % tp[1]),
               (HDR_SRC_OFFSET, b"%d" % last_offset),
               (HDR_SRC_CONFIRMED, b"%d" % confirmed)]
    if stream_time is not None:
        headers.append((HDR_STREAM_TIME, b"%d" % stream_time))
    return headers


def produce_batch(producer: "Producer", batch: "DrainedBatch", errors: List[str]) -> None:
    """Produces the changelog records of a drained batch.  Their delivery reports fill in
    ``batch.changelog_offsets`` (the offset written per table, stored with the batch's
    LMDB commit); a failed delivery is appended to ``errors`` (the worker's list), so the
    batch fails instead of committing without its changelog."""
    delivered = _remember_offset(batch.changelog_offsets, errors)
    for record in batch.records:
        produce(producer, record.topic, record.value, record.key, record.headers,
                delivered(record.table), record.partition)


def _remember_offset(offsets: Dict[str, int], errors: List[str]
                     ) -> Callable[[str], Callable[[Any, "Message"], None]]:
    """Delivery callbacks for one batch's changelog records: they note the offset written
    per table, and failures (a per-message callback replaces the producer's own, so they
    must be passed on here or the batch would commit without its changelog)."""
    def for_table(table: str) -> Callable[[Any, "Message"], None]:
        def delivered(err: Any, msg: "Message") -> None:
            if err is not None:
                errors.append(f"{msg.topic()}: {err.str()}")
            elif msg.offset() > offsets.get(table, -1):
                offsets[table] = msg.offset()

        return delivered

    return for_table


# -- reading -----------------------------------------------------------------------------
def source_of(headers: Any) -> Optional[Tuple[str, int, int]]:
    """``(source topic, partition, batch's last offset)`` of a changelog record's
    headers, or None when it has none."""
    if not headers:
        return None
    found = dict(headers.items() if isinstance(headers, dict) else headers)
    try:
        topic = found[HDR_SRC_TOPIC]
        topic = topic.decode() if isinstance(topic, (bytes, bytearray)) else str(topic)
        return topic, int(found[HDR_SRC_PARTITION]), int(found[HDR_SRC_OFFSET])
    except (KeyError, TypeError, ValueError):
        return None


def confirmed_of(headers: Any) -> Optional[Tuple[str, int, int]]:
    """``(source topic, partition, confirmed offset)`` of a changelog record's headers
    (:data:`HDR_SRC_CONFIRMED`), or None when it has none."""
    source = source_of(headers)
    if source is None:
        return None
    found = dict(headers.items() if isinstance(headers, dict) else headers)
    try:
        return source[0], source[1], int(found[HDR_SRC_CONFIRMED])
    except (KeyError, TypeError, ValueError):
        return None
