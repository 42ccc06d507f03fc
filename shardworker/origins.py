"""Exactness across the app's own topics: every record the app sends to a topic that it
also reads (a ``group_by`` repartition topic, ``through``, a sink, ``topic.send``) carries
its origin, and a task with tables applies each origin once (DESIGN.md, "Sub-topologies",
"Origins").

An origin is the sending agent, the source partition and offset of the record in hand,
and the record's sequence number among those sent for it: header :data:`HDR_ORIGIN`,
``b"<agent>|<topic>|<partition>|<offset>|<seq>"``.  An upstream batch processed again (an
at-least-once replay after a kill, or aborted transactions that the broker shows to
``read_committed`` readers, as the test broker does) sends the same records with the
same origins, in the same order, so the consuming task keeps the highest ``(offset,
seq)`` applied per ``<agent>|<topic>|<partition>`` and skips any record at or below it.
This holds when agents forward deterministically (the same record yields the same sends,
with the same keys).

:class:`OriginMarks` is that memory for one task: committed with its state in the same
LMDB transaction, and carried in its changelog records (:data:`HDR_ORIGINS`) for failover.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["HDR_ORIGIN", "HDR_ORIGINS", "OriginStamper", "OriginMarks", "parse_origin",
           "origin_of", "encode_marks", "decode_marks", "META_ORIGIN_PREFIX"]

#: header of a record the app sends to a topic it reads
HDR_ORIGIN = "shardsup.origin"
#: changelog header: the origin marks a batch advanced (JSON ``{origin: [offset, seq]}``)
HDR_ORIGINS = "shardsup.origins"
#: LMDB metadata key prefix of a task's origin marks (value: ``b"<offset> <seq>"``)
META_ORIGIN_PREFIX = "origin/"

Mark = Tuple[int, int]


class OriginStamper:
    """Numbers the records sent for one source record (per agent) and makes their
    :data:`HDR_ORIGIN` header."""

    def __init__(self) -> None:
        self._last: Optional[Tuple[str, str, int, int]] = None
        self._seq = 0

    def forget(self) -> None:
        """A new chunk: a record read again (after a rewind) numbers its sends from 0."""
        self._last = None

    def header(self, agent: str, topic: str, partition: int, offset: int) -> Tuple[str, bytes]:
        ident = (agent, topic, partition, offset)
        if ident == self._last:
            self._seq += 1
        else:
            self._last = ident
            self._seq = 0
        return HDR_ORIGIN, b"%s|%s|%d|%d|%d" % (agent.encode(), topic.encode(), partition,
                                                 offset, self._seq)


def parse_origin(value: bytes) -> Optional[Tuple[str, Mark]]:
    """``(origin, (offset, seq))`` of a :data:`HDR_ORIGIN` value, or None if malformed."""
    try:
        origin, offset, seq = value.rsplit(b"|", 2)
        return origin.decode(), (int(offset), int(seq))
    except (ValueError, UnicodeDecodeError):
        return None


def origin_of(headers: Optional[List[Tuple[str, bytes]]]) -> Optional[Tuple[str, Mark]]:
    """The origin in a record's headers (None: the record came from outside the app)."""
    if headers:
        for name, value in headers:
            if name == HDR_ORIGIN and value is not None:
                return parse_origin(value)
    return None


def encode_marks(marks: Dict[str, Mark]) -> bytes:
    return json.dumps({k: list(v) for k, v in marks.items()}, sort_keys=True).encode()


def decode_marks(raw: Any) -> Dict[str, Mark]:
    try:
        return {k: (int(v[0]), int(v[1])) for k, v in json.loads(raw).items()}
    except (ValueError, TypeError, KeyError, IndexError):
        return {}


def marks_meta(marks: Dict[str, Mark]) -> Dict[str, Optional[bytes]]:
    """The ``meta`` argument of :meth:`TaskStore.commit` that stores ``marks``."""
    return {META_ORIGIN_PREFIX + k: b"%d %d" % v for k, v in marks.items()}


def merge(into: Dict[str, Mark], marks: Dict[str, Mark]) -> None:
    """Keeps the higher mark per origin."""
    for origin, mark in marks.items():
        if mark > into.get(origin, (-1, -1)):
            into[origin] = mark


class OriginMarks:
    """The highest origin a task applied per upstream ``<agent>|<topic>|<partition>``:
    committed (in LMDB) and seen (committed or not)."""

    def __init__(self, committed: Dict[str, Mark]) -> None:
        self.committed = dict(committed)
        #: what the task has seen, committed or not: the reference for skipping
        self.seen = dict(committed)
        #: marks advanced since the last drain
        self.pending: Dict[str, Mark] = {}

    def admit(self, origin: str, mark: Mark) -> bool:
        """True (and noted) when the record of ``origin`` at ``mark`` was not applied yet;
        False: a duplicate, to be skipped."""
        seen = self.seen.get(origin)
        if seen is not None and mark <= seen:
            return False
        self.seen[origin] = mark
        self.pending[origin] = mark
        return True

    def drain(self) -> Dict[str, Mark]:
        """The marks advanced since the last drain: the drained batch's, committed with
        it (:meth:`commit`)."""
        marks, self.pending = self.pending, {}
        return marks

    def commit(self, marks: Dict[str, Mark]) -> None:
        """A drained batch with ``marks`` is in LMDB now."""
        merge(self.committed, marks)

    def abort(self) -> None:
        """Batches not committed are forgotten: their records are read again."""
        self.pending = {}
        self.seen = dict(self.committed)
