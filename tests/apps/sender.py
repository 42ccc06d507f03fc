"""Test app: ``stream.events()`` and ``await topic.send(...)`` with headers."""
import os

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2)
source = app.topic(f"{P}-in", partitions=2, key_serializer="str", value_serializer="json")
out = app.topic(f"{P}-out", partitions=2, key_serializer="str", value_serializer="json")


@app.agent(source)
async def describe(stream):
    async for event in stream.events():
        await out.send(key=event.key, value={"n": event.value["n"], "topic": event.topic,
                                             "partition": event.partition, "offset": event.offset,
                                             "timestamp": event.timestamp},
                       headers={"seen-by": "describe", **{k: v for k, v in event.headers.items()}})
