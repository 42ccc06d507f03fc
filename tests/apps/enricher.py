"""Test app: a stream–table join through a global table.  Each order is enriched with
its country as the global table ``countries`` holds it (None for a country it lacks).

Topic and group names come from ``SHARDSUP_TEST_PREFIX`` so tests never share them.
"""
import os

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2)
countries_topic = app.topic(f"{P}-countries", partitions=3, key_serializer="str",
                            value_serializer="json")
orders = app.topic(f"{P}-orders", partitions=4, key_serializer="str", value_serializer="json")
out = app.topic(f"{P}-out", partitions=4, key_serializer="str", value_serializer="json")
countries = app.global_table("countries", topic=countries_topic)


@app.agent(orders, sink=[out])
async def enrich(stream):
    async for order in stream:
        yield {"order": order["id"], "country": countries.get(order["country"])}
