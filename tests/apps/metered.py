"""Test app for metrics: the agent counts each record in a user counter, observes its
``n`` in a histogram and sets a gauge; a record with ``bad`` raises (dead-lettered)."""
import os

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2)
source = app.topic(f"{P}-in", partitions=4, value_serializer="json")
seen = app.counter("records_seen", "Records the agent saw.", labels=("parity",))
sizes = app.histogram("record_n", "The n of each record.", buckets=(10, 100, 1000))
last = app.gauge("last_n", "The n of the last record this child saw.")


@app.agent(source)
async def meter(stream):
    async for value in stream:
        if value.get("bad"):
            raise ValueError("a bad record")
        seen.labels(parity="even" if value["n"] % 2 == 0 else "odd").inc()
        sizes.observe(value["n"])
        last.set(value["n"])
