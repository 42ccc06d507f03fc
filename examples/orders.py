"""Example app: doubles order amounts, and feeds itself orders so it runs anywhere.

    shardsup start -A examples.orders --broker embedded:// -c 2

A timer (run by exactly one child: the owner of task 0_0) sends a few random orders every
half second; the ``process`` agent doubles each amount into ``totals``, and ``report``
prints one line per total so you can watch the children share the partitions.
"""
import random

import shardworker

app = shardworker.App("orders-demo", broker="embedded://", session_timeout_ms=6000)
orders = app.topic("orders", partitions=4, key_serializer="str", value_serializer="json")
totals = app.topic("totals", partitions=4, key_serializer="str", value_serializer="json")

USERS = [f"u{i}" for i in range(8)]


@app.timer(0.5)
async def make_orders() -> None:
    for _ in range(4):
        user = random.choice(USERS)
        await orders.send(key=user, value={"user": user, "amount": random.randint(1, 100)})


@app.agent(orders, sink=[totals])
async def process(stream):
    async for order in stream:
        yield {"user": order["user"], "doubled": order["amount"] * 2}


@app.agent(totals)
async def report(stream):
    async for event in stream.events():
        print(f"{event.topic}[{event.partition}]@{event.offset} {event.key}: "
              f"doubled={event.value['doubled']}", flush=True)
