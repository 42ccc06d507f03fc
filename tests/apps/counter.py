"""Test app: count and sum per key in tables; a tumbling and a hopping window.

Input records are keyed by user (str) and partitioned by Java Kafka's partitioner, as a
table needs: a key's counts live in the task of the key's partition.
"""
import os

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
WORK_SECONDS = float(os.environ.get("SHARDSUP_TEST_WORK_US", "0")) / 1e6

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2)
orders = app.topic(f"{P}-in", partitions=4, key_serializer="str", value_serializer="json")
counts = app.table("counts", default=int)
sums = app.table("sums", default=int)
per_minute = app.table("per_minute", default=int).tumbling(60.0, expires=3600.0)
hopping = app.table("hopping", default=int).hopping(60.0, 30.0)


@app.agent(orders)
async def count(stream):
    async for key, order in stream.items():
        counts[key] += 1
        sums[key] += order["amount"]          # a str amount raises TypeError: dead-lettered
        per_minute[key] += order["amount"]
        hopping[key] += 1
        if WORK_SECONDS:
            import time

            until = time.perf_counter() + WORK_SECONDS
            while time.perf_counter() < until:
                pass
