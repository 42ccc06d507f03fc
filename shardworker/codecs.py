"""Serializers for keys and values: the names a topic or table declaration accepts."""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional, Tuple

Encoder = Callable[[Any], Optional[bytes]]
Decoder = Callable[[Optional[bytes]], Any]


class CodecError(ValueError):
    """A payload could not be encoded or decoded with the declared serializer."""


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


CODECS: Dict[str, Tuple[Encoder, Decoder]] = {
    "raw": (_raw_encode, _raw_decode),
    "str": (_str_encode, _str_decode),
    "json": (_json_encode, _json_decode),
}


def get_codec(name: str) -> Tuple[Encoder, Decoder]:
    """The (encode, decode) pair for a serializer name; unknown names are a clear error."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(
            f"unknown serializer {name!r}; choose one of {', '.join(sorted(CODECS))}"
        ) from None
