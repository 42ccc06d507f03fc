"""Serializers for keys and values: a registry of named codecs that topic and table
declarations accept (DESIGN.md, "Serializers").

A codec is any object with ``dumps(obj) -> bytes`` and ``loads(bytes) -> obj``
(:class:`Codec`).  ``raw``, ``str`` and ``json`` are registered here like any other;
:func:`register` adds more.  A declaration takes a name or a codec object.

Optional attributes tune a codec:

* ``handles_none = True``: its ``dumps``/``loads`` map None to None themselves (a
  tombstone).  Otherwise the library never calls them with None: None is a tombstone.
* ``bind(topic, field)``: a codec for one topic's keys (``field="key"``) or values
  (``"value"``); ``topic`` is None for a table's stored keys and values.  Schema Registry
  codecs need the topic (their subject); ``json`` picks its exact encoder for keys and
  tables (below).
* ``roundtrip_types``: the types whose values decode back to an equal object of the same
  type (a table's write cache then hands them back without a decode).
* ``loads_present(bytes) -> obj``: ``loads`` for a payload that is not None, where a
  faster callable than ``loads`` exists (``str``: ``bytes.decode``).  A stream's keys
  go to it first (:func:`present_decoder`), so given None it must raise TypeError, as
  ``bytes.decode`` does; then ``loads`` decodes.
* ``loads_many(list) -> list``: decodes a batch's payloads (never None) at once, one
  value each, raising when any one cannot be decoded; the worker then decodes them one
  by one with ``loads``, so it must have no effects of its own (the worker's common
  case: :func:`batch_decoder`).

``json`` uses ``orjson`` for topic values when it is installed (decoding about 3.7×,
encoding 1.5× faster: ``scripts/bench/workloads/codecs.py``); keys
and table contents always go through the standard library encoder, so their bytes (which
decide partitions, LMDB keys and changelog keys) are the same with or without orjson.
"""
from __future__ import annotations

import json
from typing import (Any, Callable, Dict, List, Optional, Protocol, Tuple, Union,
                    runtime_checkable)

Encoder = Callable[[Any], Optional[bytes]]
Decoder = Callable[[Optional[bytes]], Any]
BatchDecoder = Callable[[List[bytes]], List[Any]]


class CodecError(ValueError):
    """A payload could not be encoded or decoded with the declared serializer."""


class CodecUnavailable(RuntimeError):
    """A codec cannot work right now (its Schema Registry is unreachable): not the
    record's fault, so the record is not dead-lettered; the child stops and its
    records are read again after the restart (DESIGN.md, "Serializers")."""


@runtime_checkable
class Codec(Protocol):
    """What a serializer is: bytes out of an object, an object out of bytes.  Neither is
    called with None unless the codec says ``handles_none = True``."""

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


Serializer = Union[str, Codec]


class FunctionCodec:
    """A codec made of two functions (what the built-in codecs are)."""

    def __init__(self, name: str, dumps: Encoder, loads: Decoder, *, handles_none: bool = False,
                 roundtrip_types: Tuple[type, ...] = (),
                 loads_many: Optional[BatchDecoder] = None,
                 loads_present: Optional[Callable[[bytes], Any]] = None) -> None:
        self.name = name
        self.dumps = dumps
        self.loads = loads
        self.handles_none = handles_none
        self.roundtrip_types = roundtrip_types
        if loads_many is not None:
            self.loads_many = loads_many
        if loads_present is not None:
            self.loads_present = loads_present

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


# -- raw, str ---------------------------------------------------------------------------
def _raw_encode(obj: Any) -> Optional[bytes]:
    if obj is None or isinstance(obj, bytes):
        return obj
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, str):
        return obj.encode()
    raise CodecError(f"raw serializer needs bytes or str, got {type(obj).__name__}")


def _raw_decode(data: Optional[bytes]) -> Optional[bytes]:
    return data


def _str_encode(obj: Any) -> Optional[bytes]:
    if obj is None:
        return None
    return (obj if isinstance(obj, str) else str(obj)).encode()


def _str_decode(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else data.decode()


# -- json -------------------------------------------------------------------------------
_json_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_json_string = json.encoder.encode_basestring  # what _json_dumps does for a str, minus a call


def _json_encode(obj: Any) -> Optional[bytes]:
    # ints and strs (counts, sums, keys) are most of what tables write: skip the encoder
    kind = type(obj)
    if kind is int:
        return b"%d" % obj
    if kind is str:
        return _json_string(obj).encode()
    if obj is None:
        return None
    return _json_dumps(obj).encode()


_json_text = json.JSONDecoder().decode


def _json_decode(data: Optional[bytes]) -> Any:
    # UTF-8, as Kafka's JSON serializers write it (json.loads would also sniff UTF-16/32)
    if data is None:
        return None
    return _json_text(data.decode() if isinstance(data, (bytes, bytearray)) else data)


try:  # optional: a faster json for topic values
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


def _orjson_codec() -> Optional[FunctionCodec]:
    """``json`` for topic values through orjson, when installed.  What orjson would write
    differently from the standard library or refuses (dataclasses, datetimes, subclasses
    of str/int, non-str dict keys, ints beyond 64 bits) goes to the standard library
    encoder instead; what it cannot read (NaN, huge ints) to the standard decoder.  Left
    different: floats in exponent form (``1e16``, not ``1e+16``), NaN/Infinity written as
    null, and a few types only orjson writes (UUID, Enum)."""
    if _orjson is None:
        return None
    fast_dumps = _orjson.dumps
    fast_loads = _orjson.loads
    options = (_orjson.OPT_PASSTHROUGH_DATACLASS | _orjson.OPT_PASSTHROUGH_DATETIME
               | _orjson.OPT_PASSTHROUGH_SUBCLASS)
    refused = (TypeError, _orjson.JSONEncodeError)
    unreadable = _orjson.JSONDecodeError

    def encode(obj: Any) -> Optional[bytes]:
        if obj is None:
            return None
        try:
            return fast_dumps(obj, option=options)
        except refused:
            return _json_dumps(obj).encode()

    def decode(data: Optional[bytes]) -> Any:
        if data is None:
            return None
        try:
            return fast_loads(data)
        except unreadable:
            return _json_decode(data)

    def decode_all(datas: List[bytes]) -> List[Any]:
        # what orjson reads equals what decode reads (what it refuses raises)
        return list(map(fast_loads, datas))

    return FunctionCodec("json", encode, decode, handles_none=True,
                         roundtrip_types=(int, float, str, bool), loads_many=decode_all)


class JsonCodec(FunctionCodec):
    """``json``: compact UTF-8 JSON.  Keys and table contents always use the standard
    library encoder (their bytes matter); topic values use orjson when installed."""

    def __init__(self) -> None:
        super().__init__("json", _json_encode, _json_decode, handles_none=True,
                         roundtrip_types=(int, float, str, bool))
        self.fast = _orjson_codec()

    def bind(self, topic: Optional[str], field: str) -> Codec:
        if field == "value" and topic is not None and self.fast is not None:
            return self.fast
        return self


# -- the registry ---------------------------------------------------------------------
CODECS: Dict[str, Codec] = {}


def register(name: str, codec: Codec, *, replace: bool = False) -> Codec:
    """Makes ``codec`` available by ``name`` to ``app.topic(key_serializer=...,
    value_serializer=...)`` and ``app.table(...)``.  Register before the app declares
    topics (at import of the app's module: children import it too).  Registering a
    taken name is an error unless ``replace=True``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a codec's name must be a non-empty str, not {name!r}")
    if not (callable(getattr(codec, "dumps", None)) and callable(getattr(codec, "loads", None))):
        raise TypeError(f"codec {name!r} needs dumps(obj) -> bytes and loads(bytes) -> obj")
    if name in CODECS and not replace and CODECS[name] is not codec:
        raise ValueError(f"a codec named {name!r} is registered already (replace=True to swap it)")
    CODECS[name] = codec
    return codec


register("raw", FunctionCodec("raw", _raw_encode, _raw_decode, handles_none=True,
                              roundtrip_types=(bytes,)))
register("str", FunctionCodec("str", _str_encode, _str_decode, handles_none=True,
                              roundtrip_types=(str,), loads_present=bytes.decode))
register("json", JsonCodec())


def resolve(serializer: Serializer) -> Codec:
    """The codec a declaration names (a registered name, or a codec object itself)."""
    if isinstance(serializer, str):
        try:
            return CODECS[serializer]
        except KeyError:
            raise ValueError(f"unknown serializer {serializer!r}; choose one of "
                             f"{', '.join(sorted(CODECS))} or register it "
                             "(shardworker.codecs.register)") from None
    if callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None)):
        return serializer
    raise TypeError(f"a serializer is a registered name or an object with dumps() and loads(), "
                    f"not {serializer!r}")


def bound(serializer: Serializer, topic: Optional[str] = None, field: str = "value") -> Codec:
    """``serializer``'s codec for one topic's keys or values (``topic`` None: a table's)."""
    codec = resolve(serializer)
    bind = getattr(codec, "bind", None)
    return bind(topic, field) if bind is not None else codec


def get_codec(serializer: Serializer, topic: Optional[str] = None,
              field: str = "value") -> Tuple[Encoder, Decoder]:
    """The (encode, decode) pair for a serializer name or codec, None in None out; unknown
    names are a clear error.  Built-in codecs come back as their own functions (no
    wrapper on the hot path)."""
    codec = bound(serializer, topic, field)
    if getattr(codec, "handles_none", False):
        return codec.dumps, codec.loads
    dumps, loads = codec.dumps, codec.loads

    def encode(obj: Any) -> Optional[bytes]:
        return None if obj is None else dumps(obj)

    def decode(data: Optional[bytes]) -> Any:
        return None if data is None else loads(data)

    return encode, decode


def batch_decoder(serializer: Serializer, topic: Optional[str] = None,
                  field: str = "value") -> Optional[BatchDecoder]:
    """The codec's ``loads_many`` (a batch's payloads at once), or None: it has none, and
    its payloads are decoded one by one."""
    return getattr(bound(serializer, topic, field), "loads_many", None)


def present_decoder(serializer: Serializer, topic: Optional[str] = None,
                    field: str = "value") -> Optional[Callable[[bytes], Any]]:
    """The codec's ``loads_present`` (a payload that is not None), or None: it has none."""
    return getattr(bound(serializer, topic, field), "loads_present", None)


def roundtrip_types(serializer: Serializer) -> Tuple[type, ...]:
    """Types a serializer hands back equal and of the same type (see the module doc)."""
    return tuple(getattr(resolve(serializer), "roundtrip_types", ()))


def encodes_small_ints(serializer: Serializer) -> bool:
    """True when a table with these values can encode an int of 64 bits at its batch's
    drain instead of at the write (the built-in ``json``'s encoder, in a codec that hands
    ints back from the write cache undecoded: such an int always encodes, to at most 20
    bytes, so the write cannot fail on it later).  Any other codec encodes at the write,
    where a failure fails the record that wrote the value."""
    return (bound(serializer, None, "value").dumps is _json_encode
            and int in roundtrip_types(serializer))


def serializer_name(serializer: Serializer) -> str:
    """How a serializer is shown (logs, errors): its name, or its codec's repr."""
    return serializer if isinstance(serializer, str) else getattr(serializer, "name", repr(serializer))


# -- Schema Registry codecs (shardworker.schemaregistry; imported on first use) -----------
def avro(schema_str: str, registry: Any, **options: Any) -> Codec:
    """Avro values framed for Confluent Schema Registry (magic byte, schema id): see
    :func:`shardworker.schemaregistry.avro`."""
    from . import schemaregistry

    return schemaregistry.avro(schema_str, registry, **options)


def json_schema(schema_str: str, registry: Any, **options: Any) -> Codec:
    """JSON Schema values framed for Confluent Schema Registry: see
    :func:`shardworker.schemaregistry.json_schema`."""
    from . import schemaregistry

    return schemaregistry.json_schema(schema_str, registry, **options)


def protobuf(message_class: Any, registry: Any, **options: Any) -> Codec:
    """Protobuf messages framed for Confluent Schema Registry: see
    :func:`shardworker.schemaregistry.protobuf`."""
    from . import schemaregistry

    return schemaregistry.protobuf(message_class, registry, **options)
