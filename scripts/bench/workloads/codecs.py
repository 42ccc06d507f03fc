"""What a record's value codec costs in one process, without Kafka: json through the
standard library and through orjson (when installed), and typed records on top.

Run from the repository root::

    .venv/bin/python -m scripts.bench.workloads.codecs            # 200,000 values each

Each row times encode and decode of the same values (an order like the benchmark's
records, with a nested list) by CPU time, best of ``--repeat``, in µs per value:

* ``json (stdlib)``: what keys and tables always use, and topic values without orjson;
* ``json (orjson)``: topic values with orjson installed (``shardworker.codecs``);
* ``typed (stdlib)``/``typed (orjson)``: a ``value_type`` dataclass topic (records built
  and checked on decode, ``dataclasses.asdict`` on encode) over each.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from shardworker import codecs
from shardworker.records import RecordCodec


@dataclass
class Line:
    sku: str
    qty: int


@dataclass
class Order:
    id: str
    user: str
    amount: int
    price: float
    note: Optional[str] = None
    lines: List[Line] = field(default_factory=list)


def _value(n: int) -> dict:
    return {"id": f"o{n}", "user": f"u{n % 1000}", "amount": n % 97, "price": n / 8,
            "note": None, "lines": [{"sku": f"s{n % 13}", "qty": 1 + n % 3}]}


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def measure(count: int, repeat: int) -> List[Tuple[str, float, float]]:
    """(label, encode µs, decode µs) per codec."""
    values = [_value(n) for n in range(count)]
    plain = codecs.JsonCodec()
    plain.fast = None
    rows = [("json (stdlib)", plain, values)]
    fast = codecs.bound("json", "t", "value")
    if fast is not plain and getattr(fast, "name", "") == "json" and codecs._orjson is not None:
        rows.append(("json (orjson)", fast, values))
    typed_rows = []
    for label, inner, _ in rows:
        typed = RecordCodec(Order, inner)
        orders = [typed.loads(inner.dumps(v)) for v in values]
        typed_rows.append((label.replace("json ", "typed "), typed, orders))
    out = []
    for label, codec, objs in rows + typed_rows:
        dumps, loads = codec.dumps, codec.loads
        data = [dumps(o) for o in objs]
        enc = _best(lambda: [dumps(o) for o in objs], repeat)
        dec = _best(lambda: [loads(d) for d in data], repeat)
        out.append((label, enc / count * 1e6, dec / count * 1e6))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'codec':<16} {'encode µs':>10} {'decode µs':>10}")
    for label, enc, dec in measure(args.count, args.repeat):
        print(f"{label:<16} {enc:>10.2f} {dec:>10.2f}")


if __name__ == "__main__":
    main()
