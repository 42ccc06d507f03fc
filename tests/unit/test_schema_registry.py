"""Schema Registry codecs (shardworker/schemaregistry.py) against confluent-kafka's own
serializers, with its in-process ``mock://`` registry: the bytes are the ones Java and
confluent-kafka producers write (magic byte, schema id, payload).  No broker."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, List, Optional

import pytest

pytest.importorskip("fastavro")
pytest.importorskip("confluent_kafka.schema_registry")

from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer  # noqa: E402
from confluent_kafka.schema_registry.json_schema import (JSONDeserializer,  # noqa: E402
                                                         JSONSerializer)
from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: E402

from shardworker import App, codecs  # noqa: E402
from shardworker.codecs import CodecError, CodecUnavailable  # noqa: E402
from shardworker.schemaregistry import registry_client  # noqa: E402
from tests.unit.fakes import Message  # noqa: E402
from tests.unit.test_worker_loop import running  # noqa: E402

ORDER_AVRO = json.dumps({
    "type": "record", "name": "Order", "namespace": "shop",
    "fields": [{"name": "id", "type": "string"}, {"name": "amount", "type": "long"},
               {"name": "note", "type": ["null", "string"], "default": None}]})
ORDER_JSON_SCHEMA = json.dumps({
    "$schema": "http://json-schema.org/draft-07/schema#", "title": "Order", "type": "object",
    "properties": {"id": {"type": "string"}, "amount": {"type": "integer"}},
    "required": ["id", "amount"]})


@dataclass
class Order:
    id: str
    amount: int
    note: Optional[str] = None


@pytest.fixture
def registry() -> str:
    """A fresh in-process registry URL (one client per URL in this process)."""
    return f"mock://{uuid.uuid4().hex}"


def value_context(topic: str) -> SerializationContext:
    return SerializationContext(topic, MessageField.VALUE)


# -- Avro -------------------------------------------------------------------------------
def test_avro_reads_what_confluent_kafkas_avro_serializer_writes_and_the_other_way(registry):
    topic = App("u").topic("orders", value_serializer=codecs.avro(ORDER_AVRO, registry))
    client = registry_client(registry)
    theirs = AvroSerializer(client, ORDER_AVRO)({"id": "o1", "amount": 3, "note": None},
                                                value_context("orders"))
    assert theirs[0] == 0 and len(theirs) > 5  # magic byte, 4-byte schema id, payload
    assert topic.decode_value(theirs) == {"id": "o1", "amount": 3, "note": None}
    ours = topic.encode_value({"id": "o2", "amount": 4, "note": "x"})
    assert ours[:5] == theirs[:5]  # the same subject, the same schema id
    assert AvroDeserializer(client)(ours, value_context("orders")) == {
        "id": "o2", "amount": 4, "note": "x"}
    assert client.get_latest_version("orders-value").schema_id == int.from_bytes(ours[1:5], "big")


def test_an_avro_topic_with_a_value_type_hands_out_records(registry):
    app = App("u")
    topic = app.topic("orders", value_serializer=codecs.avro(ORDER_AVRO, registry),
                      value_type=Order)
    data = topic.encode_value(Order("o1", 5))
    assert topic.decode_value(data) == Order("o1", 5)
    assert topic.encode_value(None) is None and topic.decode_value(None) is None


def test_avro_keys_use_the_key_subject(registry):
    key_schema = json.dumps({"type": "string"})
    topic = App("u").topic("orders", key_serializer=codecs.avro(key_schema, registry))
    data = topic.encode_key("k1")
    assert topic.decode_key(data) == "k1"
    assert registry_client(registry).get_subjects() == ["orders-key"]


def test_records_the_registry_cannot_read_are_the_records_fault(registry):
    topic = App("u").topic("orders", value_serializer=codecs.avro(ORDER_AVRO, registry))
    with pytest.raises(CodecError, match="avro cannot decode a record of orders"):
        topic.decode_value(b"not framed")
    with pytest.raises(CodecError, match="Schema Not Found"):
        topic.decode_value(b"\x00\x00\x00\x03\xe7\x02")  # schema id 999: unknown
    with pytest.raises(CodecError, match="cannot encode"):
        topic.encode_value({"id": "o1", "amount": "three"})


def test_an_unreachable_registry_is_not_the_records_fault():
    # port 1 on loopback: refused at once
    topic = App("u").topic("orders", value_serializer=codecs.avro(
        ORDER_AVRO, {"url": "http://127.0.0.1:1", "max.retries": 0}))
    with pytest.raises(CodecUnavailable, match="avro cannot decode"):
        topic.decode_value(b"\x00\x00\x00\x00\x01\x02")


@pytest.mark.timeout(20)
def test_the_worker_dead_letters_an_unreadable_record_but_stops_on_an_unreachable_registry(registry):
    app = App("u", broker="kafka://127.0.0.1:9")
    good = app.topic("in", value_serializer=codecs.avro(ORDER_AVRO, registry), value_type=Order)
    down = app.topic("down", value_serializer=codecs.avro(
        ORDER_AVRO, {"url": "http://127.0.0.1:1", "max.retries": 0}))
    seen: List[Any] = []

    @app.agent(good)
    async def orders(stream):  # type: ignore[no-untyped-def]
        async for order in stream:
            seen.append(order)

    @app.agent(down)
    async def unreachable(stream):  # type: ignore[no-untyped-def]
        async for order in stream:
            seen.append(order)

    with running(app) as worker:
        producer = worker.committer.producer  # type: ignore[attr-defined]
        framed = AvroSerializer(registry_client(registry), ORDER_AVRO)(
            {"id": "o1", "amount": 1, "note": None}, value_context("in"))
        worker.process_chunk([Message("in", 0, 0, framed), Message("in", 0, 1, b"junk")])
        assert seen == [Order("o1", 1)]
        assert [t for t, _k, _v in producer.records] == ["u-orders-dlq"]
        with pytest.raises(CodecUnavailable):
            worker.process_chunk([Message("down", 0, 0, b"\x00\x00\x00\x00\x01\x02")])
        assert [t for t, _k, _v in producer.records] == ["u-orders-dlq"]  # no dead letter


def test_a_table_cannot_use_a_schema_registry_codec(registry):
    with pytest.raises(TypeError, match="a table cannot use one"):
        App("u").table("t", value_serializer=codecs.avro(ORDER_AVRO, registry))


# -- JSON Schema ------------------------------------------------------------------------
def test_json_schema_interoperates_with_confluent_kafkas_json_serializers(registry):
    pytest.importorskip("jsonschema")
    topic = App("u").topic("orders", value_serializer=codecs.json_schema(ORDER_JSON_SCHEMA, registry),
                           value_type=Order)
    client = registry_client(registry)
    theirs = JSONSerializer(ORDER_JSON_SCHEMA, client)({"id": "o1", "amount": 3},
                                                       value_context("orders"))
    assert topic.decode_value(theirs) == Order("o1", 3)
    ours = topic.encode_value({"id": "o2", "amount": 4})
    assert ours[:5] == theirs[:5]
    assert JSONDeserializer(ORDER_JSON_SCHEMA, schema_registry_client=client)(
        ours, value_context("orders")) == {"id": "o2", "amount": 4, "note": None}
    with pytest.raises(CodecError, match="cannot encode"):  # the schema says no
        codecs.bound(codecs.json_schema(ORDER_JSON_SCHEMA, registry), "orders").dumps({"id": "o3"})


# -- Protobuf ---------------------------------------------------------------------------
def order_message_class() -> Any:
    """A protobuf message class built at run time (what protoc would generate)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(
        name="shardsup_test_order.proto", package="shardsup.test", syntax="proto3")
    message = proto.message_type.add(name="Order")
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    message.field.add(name="id", number=1, label=optional,
                      type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    message.field.add(name="amount", number=2, label=optional,
                      type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("shardsup.test.Order"))


def test_protobuf_interoperates_with_confluent_kafkas_protobuf_serializers(registry):
    pytest.importorskip("google.protobuf")
    from confluent_kafka.schema_registry.protobuf import (ProtobufDeserializer,
                                                          ProtobufSerializer)

    order_class = order_message_class()
    topic = App("u").topic("orders", value_serializer=codecs.protobuf(order_class, registry))
    client = registry_client(registry)
    theirs = ProtobufSerializer(order_class, client)(order_class(id="o1", amount=3),
                                                     value_context("orders"))
    assert topic.decode_value(theirs) == order_class(id="o1", amount=3)
    ours = topic.encode_value(order_class(id="o2", amount=4))
    assert ours[:5] == theirs[:5]
    assert ProtobufDeserializer(order_class, schema_registry_client=client)(
        ours, value_context("orders")) == order_class(id="o2", amount=4)
