"""Kafka's edges, in memory, for the agent test driver (:mod:`shardworker.testing`):
records in (:class:`LocalMessage`, what a consumer would hand the worker), records out
(:class:`CollectingProducer`, which keeps what the worker produces and acknowledges it
at once), and the worker's parts that would talk to a broker, replaced: the
at-least-once committer on that producer (:class:`LocalCommitter`) and the task states
with nothing to restore (:class:`LocalStates`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from confluent_kafka import KafkaError, KafkaException

from .committers import AtLeastOnce
from .partitioner import partition_for
from .state import TaskStates
from .store import TaskStore
from .tablecontext import RecordParts

if TYPE_CHECKING:  # pragma: no cover
    from .app import App

__all__ = ["LocalMessage", "Produced", "CollectingProducer", "LocalCommitter", "LocalStates",
           "Headers", "header_bytes"]


#: a record's headers as a test or the worker gives them: a dict or (name, value) pairs
Headers = Optional[Union[Dict[str, Union[str, bytes]], Sequence[Tuple[str, Union[str, bytes]]]]]


def header_bytes(headers: Headers) -> List[Tuple[str, bytes]]:
    """``headers`` as Kafka carries them: (name, bytes) pairs, a text value encoded."""
    pairs = headers.items() if isinstance(headers, dict) else headers or ()
    return [(h, v if isinstance(v, bytes) else str(v).encode()) for h, v in pairs]


# -- records in, records out ------------------------------------------------------------
class LocalMessage(RecordParts):
    """A consumed (or delivered) record: the part of ``confluent_kafka.Message`` that the
    worker, the stream and the tables read."""

    __slots__ = ("_value", "_headers")

    def __init__(self, topic: str, partition: int, offset: int, key: Optional[bytes],
                 value: Optional[bytes], headers: Optional[List[Tuple[str, bytes]]],
                 timestamp_ms: int) -> None:
        super().__init__(topic, partition, offset, timestamp_ms, key)
        self._value = value
        self._headers = headers

    def value(self) -> Optional[bytes]:
        return self._value

    def headers(self) -> Optional[List[Tuple[str, bytes]]]:
        return self._headers

    def error(self) -> None:
        return None


@dataclass
class Produced:
    """A record the worker produced, and whom to tell when it is acknowledged."""

    topic: str
    partition: int
    key: Optional[bytes]
    value: Optional[bytes]
    headers: List[Tuple[str, bytes]]
    timestamp_ms: int
    on_delivery: Optional[Callable[[Any, Any], None]]


class CollectingProducer:
    """Stands in for the child's producer: keeps every record, refuses one larger than
    ``message.max.bytes`` as librdkafka does (so oversize outputs, table values and dead
    letters take the worker's own path), and acknowledges everything on ``flush``, with
    offsets counted per topic partition (changelog offsets come from those reports).

    ``partitions`` says how many partitions a topic has, for records produced without
    one (Java Kafka's partitioner on the key, as the app's producers use)."""

    def __init__(self, max_message_bytes: int, partitions: Callable[[str], int]) -> None:
        self.max_message_bytes = max_message_bytes
        self.partitions = partitions
        #: every record produced, in order (the driver takes them out as it sorts them)
        self.records: List[Produced] = []
        self._unacked: List[Produced] = []
        self._next_offset: Dict[Tuple[str, int], int] = {}

    def produce(self, topic: str, value: Optional[bytes] = None, key: Optional[bytes] = None,
                partition: int = -1, headers: Any = None,
                on_delivery: Optional[Callable[[Any, Any], None]] = None,
                timestamp: int = 0, **_config: Any) -> None:
        size = len(value or b"") + len(key or b"") + sum(
            len(v or b"") for _h, v in headers or ())
        if size > self.max_message_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        if partition < 0:
            partition = 0 if key is None else partition_for(key, self.partitions(topic))
        record = Produced(topic, partition, key, value, header_bytes(headers),
                          timestamp or int(time.time() * 1000), on_delivery)
        self.records.append(record)
        self._unacked.append(record)

    def flush(self, timeout: float = 0) -> int:
        """Acknowledges every record: its delivery report, with its offset."""
        unacked, self._unacked = self._unacked, []
        for record in unacked:
            tp = (record.topic, record.partition)
            offset = self._next_offset.get(tp, 0)
            self._next_offset[tp] = offset + 1
            if record.on_delivery is not None:
                record.on_delivery(None, LocalMessage(
                    record.topic, record.partition, offset, record.key, record.value,
                    record.headers, record.timestamp_ms))
        return 0

    def poll(self, timeout: float = 0) -> int:
        return 0

    def __len__(self) -> int:
        return len(self._unacked)

    def take(self) -> List[Produced]:
        """The records produced since the last take."""
        records, self.records = self.records, []
        return records


# -- the worker's parts that talk to Kafka, replaced ------------------------------------
class LocalCommitter(AtLeastOnce):
    """The at-least-once committer on a :class:`CollectingProducer`, draining the tables
    after every chunk: each put is one batch, committed to LMDB before it returns."""

    drains_every_chunk = True

    def __init__(self, producer: CollectingProducer, delivery_errors: List[str]) -> None:
        # Committer's set-up only: AtLeastOnce's would make a Kafka producer
        super(AtLeastOnce, self).__init__(delivery_errors, lambda: None)
        self.producer = producer  # type: ignore[assignment]


class _NoRestore:
    """A task's store starts empty: there is no changelog to restore it from."""

    restoring = False

    def bring_up_to_date(self, task: str, store: TaskStore, tables: Any, starts: Dict[Any, int],
                         cluster_id: str, should_stop: Any) -> Dict[Any, int]:
        return dict(starts)

    def close(self) -> None:
        pass


class LocalStates(TaskStates):
    """The child's task states with no broker to ask: no cluster id, partition counts
    from the declarations, nothing to restore."""

    def __init__(self, app: "App", datadir: str, producer: CollectingProducer,
                 delivery_errors: List[str], partitions: Callable[[str], int]) -> None:
        super().__init__(app, datadir, {}, lambda task: producer,  # type: ignore[arg-type]
                         heartbeat=lambda: None, delivery_errors=delivery_errors)
        self.restorer = _NoRestore()  # type: ignore[assignment]
        self._cluster_id = ""
        for sub in self.topology.subtopologies:
            self._partitions[sub.index] = partitions(sub.leader)
