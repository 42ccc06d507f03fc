"""Stand-ins for confluent_kafka objects, shared by the unit tests."""
from __future__ import annotations

from typing import Any, List, Optional

from confluent_kafka import KafkaError, KafkaException


class Message:
    """The parts of a consumed (or delivered) confluent_kafka.Message the worker reads."""

    def __init__(self, topic: str, partition: int, offset: int, value: Optional[bytes] = None,
                 key: Optional[bytes] = b"k", headers: Optional[list] = None) -> None:
        self._where = (topic, partition, offset)
        self._value = value
        self._key = key
        self._headers = headers

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]

    def key(self) -> Optional[bytes]:
        return self._key

    def value(self) -> Optional[bytes]:
        return self._value

    def headers(self) -> Optional[list]:
        return self._headers

    def timestamp(self) -> tuple:
        """(TIMESTAMP_CREATE_TIME, epoch ms): a fixed time, 2026-01-01."""
        return 1, 1_767_225_600_000

    def error(self) -> None:
        return None


class RecordingProducer:
    """Stands in for a transactional confluent_kafka.Producer: records each call and
    raises what the test planted for a given call."""

    def __init__(self, fail: Optional[dict] = None) -> None:
        self.calls: List[str] = []
        self.fail = {name: list(errors) for name, errors in (fail or {}).items()}
        self.offsets: Any = None

    def _call(self, name: str) -> None:
        self.calls.append(name)
        planted = self.fail.get(name)
        if planted:
            raise KafkaException(planted.pop(0))

    def list_topics(self, topic: Optional[str] = None, timeout: float = -1) -> None:
        """Metadata (asked before ``init_transactions`` to connect): not recorded."""

    def begin_transaction(self) -> None:
        self._call("begin")

    def flush(self, timeout: float) -> int:
        self._call("flush")
        return 0

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
        self.offsets = [(tp.topic, tp.partition, tp.offset) for tp in offsets]
        self._call("send_offsets")

    def commit_transaction(self, timeout: float) -> None:
        self._call("commit")

    def abort_transaction(self, timeout: float) -> None:
        self._call("abort")


def error(**kind: bool) -> KafkaError:
    """A planted librdkafka error of the given kind (retriable=, fatal=, txn_requires_abort=)."""
    return KafkaError(KafkaError._STATE, "planted", **kind)
