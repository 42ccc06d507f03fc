"""Test app for typed records: orders arrive as JSON and reach the agent as ``Order``
dataclasses, are re-keyed by the ``user`` field (the repartition topic carries the type
too), summed per user in a table, and leave as ``Total`` records; big orders are also
sent on with ``topic.send(value=Order(...))``.  A record that does not make an
``Order`` is dead-lettered with the failing field named."""
import os
from dataclasses import dataclass
from typing import Optional

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]


@dataclass
class Order:
    id: str
    user: str
    amount: int
    note: Optional[str] = None


@dataclass
class Total:
    user: str
    orders: int
    amount: int


app = shardworker.App(P, broker="kafka://127.0.0.1:9092", commit_interval=0.2)
orders = app.topic(f"{P}-orders", partitions=2, key_serializer="str", value_type=Order)
totals = app.topic(f"{P}-totals", partitions=2, key_serializer="str", value_type=Total)
big = app.topic(f"{P}-big", partitions=2, key_serializer="str", value_type=Order)
counts = app.table("counts", default=int)
sums = app.table("sums", default=int)


@app.agent(orders, sink=[totals])
async def total(stream):
    async for order in stream.group_by("user", name="by-user"):
        counts[order.user] += 1
        sums[order.user] += order.amount
        if order.amount >= 100:
            await big.send(key=order.id, value=Order(order.id, order.user, order.amount, "big"))
        yield Total(order.user, counts[order.user], sums[order.user])
