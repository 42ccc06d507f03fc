"""The codec registry (shardworker/codecs.py) and typed records (shardworker/records.py):
what a declaration accepts, the exact bytes keys and tables keep, and a bad typed record
dead-lettered with its field named.  No broker."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import pytest

from shardworker import App, codecs
from shardworker.codecs import CodecError, JsonCodec, get_codec, register, resolve
from shardworker.records import RecordCodec, RecordError, dumper
from shardworker.tables import Table
from tests.unit.fakes import Message
from tests.unit.test_worker_loop import running


class Upper:
    """A user codec: text, upper-cased on the way out."""

    name = "upper"

    def dumps(self, obj: Any) -> bytes:
        return str(obj).upper().encode()

    def loads(self, data: bytes) -> Any:
        return data.decode()


@pytest.fixture
def upper() -> Any:
    codec = register("upper-test", Upper())
    yield codec
    codecs.CODECS.pop("upper-test", None)


# -- the registry -----------------------------------------------------------------------
def test_the_built_in_codecs_are_registered_codecs():
    for name in ("raw", "str", "json"):
        assert isinstance(resolve(name), codecs.Codec)
    # no wrapper on the hot path: the pair is the codec's own functions
    assert get_codec("json")[0] is resolve("json").dumps


def test_a_registered_codec_serves_topics_and_tables_by_name(upper):
    app = App("u")
    topic = app.topic("t", key_serializer="upper-test", value_serializer="upper-test")
    assert topic.encode_value("abc") == b"ABC" and topic.decode_value(b"x") == "x"
    assert topic.encode_key("k") == b"K"
    table = app.table("tab", value_serializer="upper-test")
    assert table._encode_value("v") == b"V" and table._roundtrip == ()


def test_a_codec_object_may_be_passed_directly_and_none_stays_a_tombstone():
    codec = Upper()
    encode, decode = get_codec(codec)
    assert encode(None) is None and decode(None) is None  # never handed to the codec
    assert encode("a") == b"A"
    topic = App("u").topic("t", value_serializer=codec)
    assert topic.encode_value("q") == b"Q"


def test_registry_errors_are_clear(upper):
    with pytest.raises(ValueError, match="registered already"):
        register("upper-test", Upper())
    register("upper-test", Upper(), replace=True)
    with pytest.raises(TypeError, match="dumps"):
        register("broken", object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown serializer 'yaml'.*register"):
        get_codec("yaml")
    with pytest.raises(TypeError, match="registered name or an object"):
        get_codec(42)  # type: ignore[arg-type]


# -- json: exact bytes where they matter --------------------------------------------------
STDLIB = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
SAMPLES: List[Any] = [
    0, -7, 2**70, "u1", "ünï\u2028\"\\\n\x01", True, None, 1.5, [1, "a", None], ("a", 3),
    {"user": "u1", "amount": 3, "tags": ["x", "y"], "nested": {"k": [1, 2, {"z": False}]}},
    {1: "int key"}, {"big": 2**65}, [0.1, 2.5, -3.25],
]


@pytest.mark.parametrize("value", SAMPLES, ids=range(len(SAMPLES)))
def test_json_keys_and_table_contents_keep_the_standard_library_bytes(value):
    expected = None if value is None else STDLIB(value).encode()
    for codec in (codecs.bound("json", "t", "key"), codecs.bound("json", None, "key"),
                  codecs.bound("json", None, "value")):
        assert codec.dumps(value) == expected
    table = Table("t", app_id="a")
    assert table._encode_key(value) == expected and table._encode_value(value) == expected


@pytest.mark.parametrize("value", SAMPLES, ids=range(len(SAMPLES)))
def test_json_topic_values_read_back_the_same_with_or_without_orjson(value):
    fast = codecs.bound("json", "t", "value")
    data = fast.dumps(value)
    expected = json.loads(STDLIB(value)) if value is not None else None
    assert fast.loads(data) == expected
    assert JsonCodec().loads(data) == expected  # what a reader without orjson sees
    if not isinstance(value, float) and not (isinstance(value, list) and isinstance(value[0], float)):
        # str, int, bool, containers of them: byte-identical (floats may differ in form)
        assert data == (None if value is None else STDLIB(value).encode())


def test_json_refuses_the_same_types_with_or_without_orjson():
    @dataclass
    class Point:
        x: int

    for codec in (codecs.bound("json", "t", "value"), codecs.bound("json", None, "value")):
        with pytest.raises(TypeError):
            codec.dumps(Point(1))
    assert math.isnan(codecs.bound("json", "t", "value").loads(b"NaN"))  # read as before


def test_tables_keep_their_roundtrip_types_from_the_codec():
    assert Table("a")._roundtrip == (int, float, str, bool)
    assert Table("b", value_serializer="raw")._roundtrip == (bytes,)
    assert Table("c", value_serializer="str")._roundtrip == (str,)


# -- typed records ----------------------------------------------------------------------
@dataclass
class Line:
    sku: str
    qty: int = 1


@dataclass
class Order:
    id: str
    amount: int
    price: float = 0.0
    paid: bool = False
    note: Optional[str] = None
    lines: List[Line] = field(default_factory=list)
    extra: Dict[str, int] = field(default_factory=dict)


@dataclass
class Positive:
    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError("n must be positive")


def order_codec() -> RecordCodec:
    return RecordCodec(Order, codecs.bound("json", "orders"))


def test_a_typed_record_round_trips_through_json():
    codec = order_codec()
    order = Order("o1", 3, 2.5, True, "hi", [Line("a"), Line("b", 2)], {"x": 1})
    data = codec.dumps(order)
    assert json.loads(data)["lines"] == [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}]
    assert codec.loads(data) == order
    assert codec.dumps(None) is None and codec.loads(None) is None


def test_decoding_fills_defaults_ignores_unknown_keys_and_takes_an_int_for_a_float():
    order = order_codec().loads(b'{"id": "o1", "amount": 3, "price": 2, "added_later": 1}')
    assert order == Order("o1", 3, price=2.0) and type(order.price) is float


@pytest.mark.parametrize("payload,error", [
    (b'{"id": "o1", "amount": "3"}', "Order.amount: expected int, got str"),
    (b'{"id": "o1"}', "Order.amount: required field missing"),
    (b'{"id": "o1", "amount": true}', "Order.amount: expected int, got bool"),
    (b'{"id": null, "amount": 1}', "Order.id: expected str, got null"),
    (b'{"id": "o1", "amount": 1, "note": 5}', "Order.note: expected str, got int"),
    (b'{"id": "o1", "amount": 1, "lines": [{"sku": "a"}, {"qty": 2}]}',
     "Order.lines[1].sku: required field missing"),
    (b'{"id": "o1", "amount": 1, "lines": {}}', "Order.lines: expected list, got dict"),
    (b'{"id": "o1", "amount": 1, "extra": {"x": "y"}}', "Order.extra['x']: expected int, got str"),
    (b'[1, 2]', "Order: expected an object, got list"),
])
def test_a_bad_record_names_the_field_that_failed(payload, error):
    with pytest.raises(RecordError) as raised:
        order_codec().loads(payload)
    assert str(raised.value) == error
    assert isinstance(raised.value, CodecError)


@dataclass
class Loose:
    anything: Any
    line: Optional[Line] = None
    by_name: Dict[str, Line] = field(default_factory=dict)


def test_encoding_writes_what_dataclasses_asdict_writes():
    order = Order("o1", 3, lines=[Line("a"), Line("b", 2)], extra={"x": 1})
    assert dumper(Order)(order) == dataclasses.asdict(order)
    loose = Loose([Line("c"), {"k": Line("d")}], Line("e"), {"f": Line("f")})
    assert dumper(Loose)(loose) == dataclasses.asdict(loose)
    assert dumper(Loose)(Loose(None)) == dataclasses.asdict(Loose(None))


def test_a_post_init_refusal_is_a_record_error():
    codec = RecordCodec(Positive, resolve("json"))
    with pytest.raises(RecordError, match="Positive: n must be positive"):
        codec.loads(b'{"n": -1}')


def test_encoding_takes_the_type_or_a_dict_that_makes_a_valid_record():
    codec = order_codec()
    assert json.loads(codec.dumps({"id": "o1", "amount": 2}))["paid"] is False
    with pytest.raises(RecordError, match="Order.amount: expected int"):
        codec.dumps({"id": "o1", "amount": "2"})
    with pytest.raises(RecordError, match="expected a Order or a dict, got Line"):
        codec.dumps(Line("a"))
    with pytest.raises(TypeError, match="dataclass or a pydantic model"):
        RecordCodec(dict, resolve("json"))


def test_a_topic_declared_with_value_type_hands_out_and_takes_records():
    app = App("u")
    orders = app.topic("orders", value_type=Order)
    assert orders.value_type is Order
    assert orders.decode_value(orders.encode_value(Order("o", 1))) == Order("o", 1)
    both = app.topic("a", "b", value_type=Order)
    assert all(t.value_type is Order for t in both.topics)


def test_pydantic_models_are_records_too():
    pydantic = pytest.importorskip("pydantic")

    class Item(pydantic.BaseModel):
        sku: str
        qty: int

    codec = RecordCodec(Item, resolve("json"))
    assert codec.loads(codec.dumps(Item(sku="a", qty=2))) == Item(sku="a", qty=2)
    with pytest.raises(RecordError, match=r"^Item\.qty: "):
        codec.loads(b'{"sku": "a", "qty": "many"}')


# -- through the worker -----------------------------------------------------------------
@pytest.mark.timeout(20)
def test_a_bad_typed_record_is_dead_lettered_with_the_failing_field_named():
    app = App("u", broker="kafka://127.0.0.1:9")
    source = app.topic("in", value_type=Order)
    sink = app.topic("out", value_type=Line)
    seen: List[Order] = []

    @app.agent(source, sink=[sink])
    async def lines(stream):  # type: ignore[no-untyped-def]
        async for order in stream:
            seen.append(order)
            yield Line(order.id, order.amount)

    with running(app) as worker:
        producer = worker.committer.producer  # type: ignore[attr-defined]
        worker.process_chunk([
            Message("in", 0, 0, b'{"id": "o1", "amount": 2}'),
            Message("in", 0, 1, b'{"id": "o2", "amount": "two"}'),
        ])
        assert seen == [Order("o1", 2)]
        topics = [t for t, _k, _v in producer.records]
        assert topics == ["u-lines-dlq", "out"]
        headers = dict(producer.headers[0])
        assert headers["shardsup.error"] == b"RecordError: Order.amount: expected int, got str"
        assert json.loads(producer.records[1][2]) == {"sku": "o1", "qty": 2}


@pytest.mark.timeout(20)
def test_group_by_a_field_name_reads_a_record_attribute():
    app = App("u", broker="kafka://127.0.0.1:9")
    source = app.topic("in", value_type=Order)

    @app.agent(source)
    async def by_id(stream):  # type: ignore[no-untyped-def]
        async for _order in stream.group_by("id", name="by-id"):
            pass

    with running(app) as worker:
        producer = worker.committer.producer  # type: ignore[attr-defined]
        worker.process_chunk([Message("in", 0, 0, b'{"id": "o1", "amount": 2}')])
        assert producer.records == [("u-by-id-repartition", b"o1", b'{"id": "o1", "amount": 2}')]
        assert app.topics["u-by-id-repartition"].value_type is Order
