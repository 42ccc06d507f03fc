"""The one produce helper (shardworker/produce.py) and the worker's oversize routing,
without a broker: librdkafka checks ``message.max.bytes`` at ``produce()`` itself, and a
stand-in producer plays a full queue."""
from __future__ import annotations

from typing import Any, List

import pytest
from confluent_kafka import KafkaError, Producer

from shardworker import App
from shardworker.produce import RecordTooLarge, fit_dead_letter, is_too_large, produce
from shardworker.worker import Worker
from tests.unit.fakes import Message

LIMIT = 10_000


def real_producer() -> Producer:
    """A real librdkafka producer that never connects (nothing here waits for a broker)."""
    return Producer({"bootstrap.servers": "127.0.0.1:9", "message.max.bytes": LIMIT})


class FullQueue:
    """Raises BufferError for the first ``full`` produce calls, then takes the record."""

    def __init__(self, full: int) -> None:
        self.full = full
        self.polls = 0
        self.records: List[Any] = []
        self.partitions: List[int] = []  # of every call, the ones refused too

    def produce(self, topic: str, value: Any, key: Any, **kwargs: Any) -> None:
        self.partitions.append(kwargs["partition"])
        if self.full:
            self.full -= 1
            raise BufferError("Local: Queue full")
        self.records.append((topic, value, key, kwargs.get("headers")))

    def poll(self, timeout: float) -> int:
        self.polls += 1
        return 0


def test_a_record_over_message_max_bytes_is_named_not_raised_as_kafka_error():
    producer = real_producer()
    with pytest.raises(RecordTooLarge, match="message.max.bytes"):
        produce(producer, "out", b"x" * LIMIT, b"k")
    produce(producer, "out", b"x" * (LIMIT // 2), b"k")  # under the limit: queued
    producer.purge()


def test_a_full_queue_is_waited_out_by_serving_delivery_reports():
    producer = FullQueue(full=3)
    produce(producer, "dlq", b"v", b"k", [("h", b"1")])  # type: ignore[arg-type]
    assert producer.polls == 3 and producer.records == [("dlq", b"v", b"k", [("h", b"1")])]


def test_a_truncated_dead_letter_fits_and_keeps_its_error_headers():
    headers = [("shardsup.error", b"ValueError: boom"), ("shardsup.traceback", b"t" * 8000),
               ("shardsup.offset", b"42")]
    value, kept = fit_dead_letter(b"y" * 50_000, b"key", headers, LIMIT)
    names = [name for name, _ in kept]
    assert names == ["shardsup.error", "shardsup.traceback", "shardsup.offset", "shardsup.truncated"]
    assert dict(kept)["shardsup.error"] == b"ValueError: boom"
    assert dict(kept)["shardsup.truncated"] == b"50000"
    assert 0 < len(value) < 50_000
    producer = real_producer()
    produce(producer, "dlq", value, b"key", kept)  # librdkafka takes it
    producer.purge()


def test_the_broker_refusing_an_output_as_too_large_is_recognised():
    assert is_too_large(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    assert not is_too_large(KafkaError(KafkaError._MSG_TIMED_OUT))
    assert not is_too_large(None)


def test_an_output_refused_as_too_large_dead_letters_its_input_instead_of_failing_the_batch():
    app = App("u")
    source = app.topic("in")

    @app.agent(source)
    def agent(stream):  # pragma: no cover - never run here
        yield from stream

    from shardworker.committers import AtLeastOnce

    worker = Worker(app, channel=None, bootstrap="127.0.0.1:9", index=0)  # type: ignore[arg-type]
    worker.committer = AtLeastOnce(app, {"bootstrap.servers": "127.0.0.1:9"},
                                   worker._delivery_errors, worker.heartbeat)
    worker.committer.producer = worker.producer = FullQueue(full=1)  # type: ignore[assignment]
    record = Message("in", 1, 7, b"input")
    worker._on_output_delivery(agent, record, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE),
                               Message("out", 1, -1, b"big"))
    assert worker._delivery_errors == []
    [(topic, value, key, headers)] = worker.producer.records  # type: ignore[attr-defined]
    assert (topic, value, key) == ("u-agent-dlq", b"input", b"k")
    assert dict(headers)["shardsup.offset"] == b"7"
    assert dict(headers)["shardsup.error"].startswith(b"RecordTooLarge: out")
    # any other delivery failure still fails the batch (it is read again)
    worker._on_output_delivery(agent, record, KafkaError(KafkaError._MSG_TIMED_OUT),
                               Message("out", 1, -1, b"v"))
    assert len(worker._delivery_errors) == 1


def test_check_fits_refuses_what_librdkafka_would_refuse():
    from shardworker.produce import check_fits

    check_fits("t-changelog", b"k", b"v" * (LIMIT - 600), LIMIT)
    with pytest.raises(RecordTooLarge, match="t-changelog"):
        check_fits("t-changelog", b"k", b"v" * LIMIT, LIMIT)
    producer = real_producer()  # what passes the check, librdkafka takes
    produce(producer, "t-changelog", b"v" * (LIMIT - 600), b"k")
    producer.purge()


def test_a_given_partition_goes_through_and_the_queue_is_still_waited_out():
    producer = FullQueue(full=1)
    produce(producer, "t-changelog", b"v", b"k", partition=3)  # type: ignore[arg-type]
    assert producer.partitions == [3, 3] and producer.polls == 1
    produce(producer, "out", b"v", b"k")  # type: ignore[arg-type]
    assert producer.partitions[-1] == -1  # no partition given: librdkafka's partitioner
