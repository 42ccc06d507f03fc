"""Test app: one table fed by two topics that declare no partition count (so the broker's
topics decide; the co-partitioning check at start is what guards them), and an agent
that moves its loop to another topic with ``through``."""
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


# `through`: the loop goes on with the records on the tasks of a topic the app names
events = app.topic(f"{P}-events", key_serializer="str")
audited = app.topic(f"{P}-audited", key_serializer="str")
audit_counts = app.table("audit_counts", default=int)


@app.agent(events)
async def audit(stream):
    async for key, _value in stream.through(audited).items():
        audit_counts[key] += 1
