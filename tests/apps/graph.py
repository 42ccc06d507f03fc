"""Test app with a stream graph (issue 13): orders keyed by order id are re-keyed by
customer (``group_by``) and summed in a table that a second topic (customers) also
feeds; lines are split into words sent to a topic another agent counts.

Sub-topologies: 0 orders (forwarded), 1 the repartition topic + customers (tables
by_customer, orders_seen, names), 2 lines, 3 words (table word_counts).
"""
import os
import time

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
#: fault injection for the kill -9 test: re-keying these order ids stalls (once each,
#: after writing the child's pid to a marker file in this directory) so the test kills
#: a child that has forwarded part of its batch and reported none of it (an event, not
#: a time: DESIGN.md, "Tests and the broker")
STALL_DIR = os.environ.get("SHARDSUP_TEST_STALL_DIR")
STALL_AT = {int(n) for n in os.environ.get("SHARDSUP_TEST_STALL_AT", "").split(",") if n}


def customer_of(order):
    if STALL_DIR and order["id"] in STALL_AT:
        marker = os.path.join(STALL_DIR, f"stall-{order['id']}")
        if not os.path.exists(marker):
            with open(marker + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(marker + ".tmp", marker)
            time.sleep(60)  # the test kills this process here
    return order["customer"]

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2,
                      processing_guarantee=os.environ.get("SHARDSUP_TEST_GUARANTEE", "at_least_once"))
orders = app.topic(f"{P}-orders", partitions=4, value_serializer="json")   # keyed by order id
customers = app.topic(f"{P}-customers", partitions=4, key_serializer="str", value_serializer="json")
lines = app.topic(f"{P}-lines", partitions=4, value_serializer="str")
words = app.topic(f"{P}-words", partitions=4, key_serializer="str", value_serializer="json")
out = app.topic(f"{P}-out", partitions=4, key_serializer="json", value_serializer="json")

by_customer = app.table("by_customer", default=int)
orders_seen = app.table("orders_seen", default=int)
names = app.table("names")
word_counts = app.table("word_counts", default=int)


@app.agent(orders, sink=[out])
async def spend(stream):
    async for order in stream.group_by(customer_of, name="by-customer"):
        by_customer[order["customer"]] += order["amount"]   # runs where the new key lives
        orders_seen[order["customer"]] += 1
        yield {"order": order["id"], "customer": order["customer"],
               "name": names.get(order["customer"])}


@app.agent(customers)
async def keep_names(stream):
    async for key, customer in stream.items():
        names[key] = customer["name"]


@app.agent(lines)
async def split(stream):
    async for line in stream:
        for word in line.split():
            await words.send(key=word, value=1)


@app.agent(words)
async def count(stream):
    async for key, n in stream.items():
        word_counts[key] += n
