"""Test app: one table fed by two topics that declare no partition count (so the broker's
topics decide; the co-partitioning check at start is what guards them)."""
import os

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000)
clicks = app.topic(f"{P}-clicks", key_serializer="str")
views = app.topic(f"{P}-views", key_serializer="str")
seen = app.table("seen", default=int)


@app.agent(app.topic(f"{P}-clicks", f"{P}-views", key_serializer="str"))
async def count(stream):
    async for key, _value in stream.items():
        seen[key] += 1
