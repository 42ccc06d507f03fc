"""Example app: a stream–table join through a global table (DESIGN.md, "Global tables").

    shardsup start -A examples.enrich --broker embedded:// -c 2

A timer (run by exactly one child) renames a random country now and then and sends a few
orders every half second; ``enrich`` joins each order with its country from the global
table ``countries``, which every child reads from the supervisor's one copy, and
``report`` prints each enriched order.  ``shardsup table -A examples.enrich countries``
shows the copy (``--datadir`` as given to ``start``).
"""
import random

import shardworker

app = shardworker.App("enrich-demo", broker="embedded://", session_timeout_ms=6000)
countries_topic = app.topic("countries", partitions=2, key_serializer="str",
                            value_serializer="json")
orders = app.topic("orders", partitions=4, key_serializer="str", value_serializer="json")
enriched = app.topic("enriched", partitions=4, key_serializer="str", value_serializer="json")
countries = app.global_table("countries", topic=countries_topic)

CODES = ["DE", "FR", "IT", "ES", "NL", "PL"]


@app.timer(0.5)
async def make_orders() -> None:
    if random.random() < 0.2 or len(countries) < len(CODES):
        code = random.choice(CODES)
        await countries_topic.send(key=code, value={"code": code,
                                                    "label": f"{code}-{random.randint(1, 99)}"})
    for _ in range(3):
        user = f"u{random.randint(0, 7)}"
        await orders.send(key=user, value={"user": user, "country": random.choice(CODES + ["XX"])})


@app.agent(orders, sink=[enriched])
async def enrich(stream):
    async for order in stream:
        yield {**order, "country": countries.get(order["country"])}


@app.agent(enriched)
async def report(stream):
    async for order in stream:
        print(f"{order['user']}: {order['country']}", flush=True)
