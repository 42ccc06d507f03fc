"""Typed records: ``app.topic(..., value_type=Order)`` hands agents ``Order`` instances
and takes them back (DESIGN.md, "Serializers").

``Order`` is a dataclass, or a pydantic (v2) model when pydantic is installed (it is
never required: a model is recognised by its ``model_validate``/``model_dump``).  The
topic's codec (``json`` by default, or any other that reads to and writes from a dict,
Avro included) carries the dict; this module turns it into the record and back:

* decoding checks that every field without a default is present and that values have
  their annotated types (int, float, str, bool, Optional[...], list/List[...],
  dict/Dict[..., ...], nested dataclasses; other annotations are not checked); a
  failure is a :class:`RecordError` naming the field (``Order.amount: expected int, got
  str``), which the agent's error policy dead-letters.  Keys that are not fields are
  ignored (a newer producer may add fields).
* encoding takes an instance of the type (``dataclasses.asdict``'s dict, or ``model_dump``) or
  a dict, which must make a valid record (so ``shardsup send`` works on typed topics).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Dict, Optional, Tuple

from .codecs import Codec, CodecError, Serializer, bound

Check = Callable[[Any, str], Any]


class RecordError(CodecError):
    """A value does not make a record of the declared type; the message names the field."""


_NAMES = {int: "int", float: "float", str: "str", bool: "bool", list: "list", dict: "dict"}


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _scalar(expected: type) -> Check:
    name = _NAMES[expected]
    if expected is float:
        def check_float(value: Any, where: str) -> Any:
            kind = type(value)
            if kind is float:
                return value
            if kind is int:  # JSON writes 3.0 as 3 in some producers
                return float(value)
            raise RecordError(f"{where}: expected float, got {_kind(value)}")
        return check_float

    def check(value: Any, where: str) -> Any:
        if type(value) is not expected:  # bool is not an int here
            raise RecordError(f"{where}: expected {name}, got {_kind(value)}")
        return value
    return check


def _anything(value: Any, where: str) -> Any:
    return value


def checker(annotation: Any) -> Check:
    """A function that checks (and builds, for nested records) one annotated value."""
    if annotation in _NAMES:
        return _scalar(annotation)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        build = builder(annotation)
        return lambda value, where: build(value, where)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or _is_union_type(origin):
        if type(None) in args and len(args) == 2:
            inner = checker(next(a for a in args if a is not type(None)))
            return lambda value, where: None if value is None else inner(value, where)
        return _anything  # other unions: not checked
    if origin is list:
        return _sequence(checker(args[0]) if args else _anything)
    if origin is dict:
        return _mapping(checker(args[1]) if len(args) == 2 else _anything)
    return _anything


_UNION_TYPE = getattr(types, "UnionType", None)  # X | None, Python 3.10+


def _is_union_type(origin: Any) -> bool:
    return _UNION_TYPE is not None and origin is _UNION_TYPE


def _sequence(item: Check) -> Check:
    def check(value: Any, where: str) -> Any:
        if type(value) is not list:
            raise RecordError(f"{where}: expected list, got {_kind(value)}")
        if item is _anything:
            return value
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return check


def _mapping(item: Check) -> Check:
    def check(value: Any, where: str) -> Any:
        if type(value) is not dict:
            raise RecordError(f"{where}: expected dict, got {_kind(value)}")
        if item is _anything:
            return value
        return {k: item(v, f"{where}[{k!r}]") for k, v in value.items()}
    return check


_BUILDERS: Dict[type, Callable[[Any, str], Any]] = {}


def builder(cls: type) -> Callable[[Any, str], Any]:
    """A function ``(data, where) -> cls instance`` for a dataclass: checks presence and
    types of its fields (nested dataclasses built too).  Made once per class."""
    cached = _BUILDERS.get(cls)
    if cached is not None:
        return cached
    fields: Tuple[Tuple[str, bool, Optional[Check]], ...] = ()

    def build(data: Any, where: str) -> Any:
        if type(data) is not dict:
            raise RecordError(f"{where}: expected an object, got {_kind(data)}")
        kwargs = {}
        for name, required, check in fields:
            if name in data:
                kwargs[name] = check(data[name], f"{where}.{name}")  # type: ignore[misc]
            elif required:
                raise RecordError(f"{where}.{name}: required field missing")
        try:
            return cls(**kwargs)
        except RecordError:
            raise
        except (TypeError, ValueError) as exc:  # __post_init__ refused it
            raise RecordError(f"{where}: {exc}") from exc

    _BUILDERS[cls] = build  # before the fields: a record may nest itself
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable name: check what is not a string
        hints = {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}
    fields = tuple(
        (f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
         checker(hints.get(f.name, Any)))
        for f in dataclasses.fields(cls) if f.init)
    return build


_DUMPERS: Dict[type, Callable[[Any], Dict[str, Any]]] = {}


def dumper(cls: type) -> Callable[[Any], Dict[str, Any]]:
    """A function ``record -> dict`` for a dataclass: what ``dataclasses.asdict`` gives
    for the annotations :func:`checker` knows, without its deep copy (several times
    faster); values of other annotations go through ``asdict``'s rules."""
    cached = _DUMPERS.get(cls)
    if cached is not None:
        return cached
    fields: Tuple[Tuple[str, Optional[Callable[[Any], Any]]], ...] = ()

    def dump(obj: Any) -> Dict[str, Any]:
        return {name: value if convert is None else convert(value)  # type: ignore[misc]
                for name, convert in fields for value in (getattr(obj, name),)}

    _DUMPERS[cls] = dump
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable name: copy as asdict does
        hints = {}
    fields = tuple((f.name, _converter(hints.get(f.name, Any))) for f in dataclasses.fields(cls))
    return dump


def _converter(annotation: Any) -> Optional[Callable[[Any], Any]]:
    """None when the value is written as it is (scalars, containers of scalars)."""
    if annotation in _NAMES:
        return None
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        dump = dumper(annotation)
        return lambda value: None if value is None else dump(value)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if (origin is typing.Union or _is_union_type(origin)) and type(None) in args and len(args) == 2:
        return _converter(next(a for a in args if a is not type(None)))
    if origin is list and args:
        item = _converter(args[0])
        return None if item is None else (lambda value: [item(v) for v in value])
    if origin is dict and len(args) == 2:
        item = _converter(args[1])
        return None if item is None else (lambda value: {k: item(v) for k, v in value.items()})
    return _as_plain


def _as_plain(value: Any) -> Any:
    """A value of an annotation the records module does not know, as ``asdict`` does it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_as_plain(v) for v in value) if not hasattr(value, "_fields") \
            else type(value)(*(_as_plain(v) for v in value))
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    return value


def is_pydantic_model(cls: Any) -> bool:
    """A pydantic v2 model class, told without importing pydantic."""
    return isinstance(cls, type) and callable(getattr(cls, "model_validate", None)) and \
        callable(getattr(cls, "model_dump", None))


class RecordCodec:
    """``inner`` (a codec that reads and writes dicts) with records of ``value_type``."""

    handles_none = True

    def __init__(self, value_type: type, inner: Codec) -> None:
        if not (dataclasses.is_dataclass(value_type) and isinstance(value_type, type)) \
                and not is_pydantic_model(value_type):
            raise TypeError(f"value_type must be a dataclass or a pydantic model, "
                            f"not {value_type!r}")
        self.value_type = value_type
        self.inner = inner
        self.name = f"{getattr(inner, 'name', 'codec')}[{value_type.__name__}]"
        self._label = value_type.__name__
        self._pydantic = is_pydantic_model(value_type)
        self._build = None if self._pydantic else builder(value_type)
        self._dump = None if self._pydantic else dumper(value_type)
        self._inner_dumps = inner.dumps
        self._inner_loads = inner.loads
        self._inner_none = bool(getattr(inner, "handles_none", False))

    def __repr__(self) -> str:
        return f"<codec {self.name}>"

    def record(self, data: Any) -> Any:
        """A dict (as decoded) made into a record; :class:`RecordError` names the field."""
        if self._build is not None:
            return self._build(data, self._label)
        try:
            return self.value_type.model_validate(data)  # type: ignore[attr-defined]
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise RecordError(_pydantic_message(self._label, exc)) from exc

    def as_dict(self, obj: Any) -> Any:
        """A record (or a dict that makes a valid one) as the dict the codec writes."""
        if isinstance(obj, self.value_type):
            return obj.model_dump(mode="json") if self._dump is None else self._dump(obj)
        if isinstance(obj, dict):
            return self.as_dict(self.record(obj))
        raise RecordError(f"{self._label}: expected a {self._label} or a dict, got {_kind(obj)}")

    def dumps(self, obj: Any) -> Optional[bytes]:
        if obj is None:
            return self._inner_dumps(None) if self._inner_none else None
        return self._inner_dumps(self.as_dict(obj))

    def loads(self, data: Optional[bytes]) -> Any:
        if data is None and not self._inner_none:
            return None
        value = self._inner_loads(data)
        return None if value is None else self.record(value)


def _pydantic_message(label: str, exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join([label, *(str(p) for p in first.get("loc", ()))])
            return f"{where}: {first.get('msg', exc)}"
        except Exception:  # noqa: BLE001 - fall back to the plain message
            pass
    return f"{label}: {exc}"


def typed_codec(serializer: Serializer, value_type: Optional[type], topic: Optional[str],
                field: str = "value") -> Codec:
    """The codec of a topic's values: ``serializer`` bound to the topic, with records of
    ``value_type`` when one is declared."""
    codec = bound(serializer, topic, field)
    return codec if value_type is None else RecordCodec(value_type, codec)
