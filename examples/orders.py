"""Example app: orders re-keyed by user and counted (two stages), joined with a global
table; it feeds itself, so it runs anywhere.

    shardsup start -A examples.orders --broker embedded:// -c 2

A timer (run by exactly one child) sends each user's tier to the ``tiers`` topic once
and a few random orders, keyed by order id, every half second.  ``per_user`` re-keys the
orders by user (``group_by``: through the topic ``orders-demo-by-user-repartition``), so
each user's count, sum and orders per minute (a tumbling window) live in one task's
tables, and joins each order with the user's tier from the global table ``tiers``.
``report`` logs one line per order, with the child (its tasks and pid) that printed it,
so you can watch the children share the work.  In a second terminal,
``shardsup status -A examples.orders`` shows the sub-topologies (0: orders, forwarded;
1: the repartition topic with the tables; 2: totals) and the children, and
``shardsup table -A examples.orders spent`` the sums.
"""
import logging
import os
import random
import uuid

import shardworker

app = shardworker.App("orders-demo", broker="embedded://", session_timeout_ms=6000)
orders = app.topic("orders", partitions=4, key_serializer="str", value_serializer="json")
tiers_topic = app.topic("tiers", partitions=2, key_serializer="str", value_serializer="json")
totals = app.topic("totals", partitions=4, key_serializer="str", value_serializer="json")
tiers = app.global_table("tiers", topic=tiers_topic)
spent = app.table("spent", default=int)
counted = app.table("counted", default=int)
#: orders per user and minute (a tumbling window of the record's timestamp)
per_minute = app.table("per_minute", default=int).tumbling(60.0, expires=600.0)
#: each line says which child printed it: ``[child <its tasks>]`` and its pid
log = logging.getLogger("demo")

USERS = [f"u{i}" for i in range(8)]
_tiers_sent = False


@app.timer(0.5)
async def make_orders() -> None:
    global _tiers_sent
    if not _tiers_sent:
        for user in USERS:
            await tiers_topic.send(key=user, value=random.choice(["gold", "silver", "bronze"]))
        _tiers_sent = True
        return  # orders from the next tick on: the global table's copy has the tiers
    for _ in range(4):
        user = random.choice(USERS)
        await orders.send(key=uuid.uuid4().hex[:8],
                          value={"user": user, "amount": random.randint(1, 100)})


@app.agent(orders, sink=[totals])
async def per_user(stream):
    async for order in stream.group_by(lambda o: o["user"], name="by-user"):
        user = order["user"]
        spent[user] += order["amount"]
        counted[user] += 1
        per_minute[user] += 1
        yield {"user": user, "tier": tiers.get(user), "orders": counted[user],
               "spent": spent[user], "this_minute": per_minute[user].current()}


@app.agent(totals)
async def report(stream):
    async for event in stream.events():
        total = event.value
        log.info("pid %d: %s[%d]@%d %s (%s): orders=%d spent=%d this minute=%d", os.getpid(),
                 event.topic, event.partition, event.offset, total["user"], total["tier"],
                 total["orders"], total["spent"], total["this_minute"])
