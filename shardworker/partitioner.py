"""Java Kafka's default key partitioner, so a key maps to the same partition here as in
any Java, Kafka Streams or librdkafka (``partitioner=murmur2_random``) producer.

Kafka's ``DefaultPartitioner`` / ``BuiltInPartitioner`` computes, for a non-null key::

    Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions      # toPositive = & 0x7fffffff

:func:`murmur2` is a bit-for-bit port of ``org.apache.kafka.common.utils.Utils.murmur2``
(MurmurHash2, seed ``0x9747b28c``, little-endian 4-byte blocks) and returns Java's signed
32-bit ``int``.  Records without a key have no partition by key (producers spread them),
so :func:`partition_for` refuses ``None``.
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Optional

__all__ = ["murmur2", "to_positive", "partition_for", "key_partitioner", "KeyPartitioner"]

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Java Kafka's ``Utils.murmur2(data)``: a signed 32-bit int, as Java returns it."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    n4 = length // 4
    if n4:
        for (k,) in struct.iter_unpack("<I", data[: n4 * 4]):
            k = (k * _M) & _MASK
            k ^= k >> 24
            k = (k * _M) & _MASK
            h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        base = length & ~3
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h ^= data[base]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - 0x100000000 if h & 0x80000000 else h


def to_positive(number: int) -> int:
    """Java Kafka's ``Utils.toPositive``: clears the sign bit (not ``abs``)."""
    return number & 0x7FFFFFFF


def partition_for(key_bytes: Optional[bytes], partitions: int) -> int:
    """The partition Java Kafka's default partitioner picks for ``key_bytes``."""
    if key_bytes is None:
        raise ValueError("a record without a key has no partition by key")
    if partitions <= 0:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    return to_positive(murmur2(bytes(key_bytes))) % partitions


class KeyPartitioner:
    """``key -> partition`` for a topic with ``partitions`` partitions whose keys are
    serialized by ``encode_key`` (e.g. ``topic.encode_key``); :meth:`of_bytes` does the
    same for a key already serialized (a record's raw key).  Tables use it only to warn
    about a write that is likely on the wrong task (DESIGN.md, "State (LMDB)"): the
    upstream producer's partitioner is unknown, so it never refuses anything."""

    def __init__(self, encode_key: Callable[[Any], Optional[bytes]], partitions: int) -> None:
        self.encode_key = encode_key
        self.partitions = partitions

    def __call__(self, key: Any) -> int:
        return partition_for(self.encode_key(key), self.partitions)

    def of_bytes(self, key_bytes: Optional[bytes]) -> int:
        return partition_for(key_bytes, self.partitions)


def key_partitioner(encode_key: Callable[[Any], Optional[bytes]],
                    partitions: int) -> KeyPartitioner:
    """A :class:`KeyPartitioner` (callable: ``key -> partition``)."""
    return KeyPartitioner(encode_key, partitions)
