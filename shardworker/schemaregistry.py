"""Codecs for Confluent Schema Registry: Avro, JSON Schema and Protobuf values framed
as Java and confluent-kafka producers frame them (magic byte 0, 4-byte schema id,
payload), through confluent-kafka's own serializers (DESIGN.md, "Serializers").

Needs the ``schema-registry`` extra (``pip install shardsup[schema-registry]``); nothing
here is imported until an app declares such a codec.  The registry client and the
serializers are made on first use, in the process that uses them (a child makes its own
after it starts), and one client is shared per registry URL in a process: so two codecs
of one ``mock://`` URL (confluent-kafka's in-process registry, for tests) see the same
schemas.

Errors: a record the serializer refuses, or whose schema id the registry does not know,
is a :class:`~shardworker.codecs.CodecError` (dead-lettered by the agent's policy); a
registry that cannot be reached (connection refused, 5xx, auth) is
:class:`~shardworker.codecs.CodecUnavailable`, which stops the child instead, so its
records are read again rather than dead-lettered.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional, Union

from .codecs import CodecError, CodecUnavailable

#: what the registry answers when the record, not the registry, is wrong: an unknown
#: schema id or subject, an incompatible or invalid schema
RECORD_FAULTS = (404, 409, 422)
_HTTP_LIBRARIES = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3", "h11")

_clients: Dict[Any, Any] = {}
_clients_lock = threading.Lock()

Registry = Union[str, Dict[str, Any], Any]


def registry_client(registry: Registry) -> Any:
    """A ``SchemaRegistryClient`` for a URL (``http://...``, ``mock://...``), a client
    config dict, or a client itself; one per URL/config in a process."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    if not isinstance(registry, (str, dict)):
        return registry
    conf = {"url": registry} if isinstance(registry, str) else dict(registry)
    cache_key = tuple(sorted((k, repr(v)) for k, v in conf.items()))
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            new_client = getattr(SchemaRegistryClient, "new_client", None)  # mock:// support
            client = new_client(conf) if new_client is not None else SchemaRegistryClient(conf)
            _clients[cache_key] = client
    return client


def _is_unavailable(exc: BaseException) -> bool:
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    if isinstance(exc, SchemaRegistryError):
        return exc.http_status_code not in RECORD_FAULTS
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in _HTTP_LIBRARIES


class SchemaRegistryCodec:
    """One format (``avro``, ``json_schema``, ``protobuf``) for one topic's keys or
    values, once bound (:meth:`bind`, which ``app.topic`` does)."""

    #: confluent-kafka's serializers map None to None (a tombstone) themselves
    handles_none = True

    def __init__(self, name: str, registry: Registry,
                 make_serializer: Callable[[Any], Any], make_deserializer: Callable[[Any], Any],
                 topic: Optional[str] = None, field: str = "value") -> None:
        self.name = name
        self.registry = registry
        self._make_serializer = make_serializer
        self._make_deserializer = make_deserializer
        self.topic = topic
        self.field = field
        self._serializer: Any = None
        self._deserializer: Any = None
        self._context: Any = None

    def __repr__(self) -> str:
        where = f" {self.topic} {self.field}" if self.topic else ""
        return f"<codec {self.name}{where}>"

    def bind(self, topic: Optional[str], field: str) -> "SchemaRegistryCodec":
        """This codec for ``topic``'s keys or values (the subject is ``<topic>-<field>``
        with the default subject name strategy)."""
        if topic is None:
            raise TypeError(f"{self.name}: Schema Registry codecs serialize a topic's records "
                            "(their subject is named after it); a table cannot use one")
        return SchemaRegistryCodec(self.name, self.registry, self._make_serializer,
                                   self._make_deserializer, topic, field)

    def context(self) -> Any:
        """The ``SerializationContext`` of this codec's topic and field."""
        if self._context is None:
            if self.topic is None:
                raise CodecError(f"{self.name}: not bound to a topic (declare it as a topic's "
                                 "serializer)")
            from confluent_kafka.serialization import MessageField, SerializationContext

            field = MessageField.KEY if self.field == "key" else MessageField.VALUE
            self._context = SerializationContext(self.topic, field)
        return self._context

    def dumps(self, obj: Any) -> Optional[bytes]:
        try:
            if self._serializer is None:
                self._serializer = self._make_serializer(registry_client(self.registry))
            return self._serializer(obj, self.context())  # type: ignore[no-any-return]
        except (CodecError, CodecUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - sorted into the record's fault or not
            raise self._error("cannot encode", exc) from exc

    def loads(self, data: Optional[bytes]) -> Any:
        try:
            if self._deserializer is None:
                self._deserializer = self._make_deserializer(registry_client(self.registry))
            return self._deserializer(data, self.context())
        except (CodecError, CodecUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - sorted into the record's fault or not
            raise self._error("cannot decode", exc) from exc

    def _error(self, what: str, exc: Exception) -> Exception:
        message = f"{self.name} {what} a record of {self.topic}: {type(exc).__name__}: {exc}"
        return CodecUnavailable(message) if _is_unavailable(exc) else CodecError(message)


def avro(schema_str: str, registry: Registry, *, serializer_conf: Optional[Dict[str, Any]] = None,
         deserializer_conf: Optional[Dict[str, Any]] = None) -> SchemaRegistryCodec:
    """Avro records of ``schema_str``: dicts in and out (or typed records with
    ``value_type``).  Decoding reads each record with the schema its id names (the
    writer's), resolved to ``schema_str`` (the reader's), as AvroDeserializer does."""
    from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer

    return SchemaRegistryCodec(
        "avro", registry,
        lambda client: AvroSerializer(client, schema_str, conf=serializer_conf),
        lambda client: AvroDeserializer(client, schema_str, conf=deserializer_conf))


def json_schema(schema_str: str, registry: Registry, *,
                serializer_conf: Optional[Dict[str, Any]] = None,
                deserializer_conf: Optional[Dict[str, Any]] = None) -> SchemaRegistryCodec:
    """JSON documents validated against ``schema_str`` on the way out and in: dicts (or
    typed records with ``value_type``)."""
    from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer

    return SchemaRegistryCodec(
        "json_schema", registry,
        lambda client: JSONSerializer(schema_str, client, conf=serializer_conf),
        lambda client: JSONDeserializer(schema_str, schema_registry_client=client,
                                        conf=deserializer_conf))


def protobuf(message_class: Any, registry: Registry, *,
             serializer_conf: Optional[Dict[str, Any]] = None,
             deserializer_conf: Optional[Dict[str, Any]] = None) -> SchemaRegistryCodec:
    """Protobuf messages of ``message_class`` (a generated message class) in and out."""
    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer

    return SchemaRegistryCodec(
        "protobuf", registry,
        lambda client: ProtobufSerializer(message_class, client, conf=serializer_conf),
        lambda client: ProtobufDeserializer(message_class, conf=deserializer_conf,
                                            schema_registry_client=client))


__all__ = ["SchemaRegistryCodec", "avro", "json_schema", "protobuf", "registry_client"]
