"""Test app: the doubler as a plain ``def`` agent (no asyncio) using ``items()``."""
import os

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2)
source = app.topic(f"{P}-in", partitions=2, key_serializer="str", value_serializer="json")
sink = app.topic(f"{P}-out", partitions=2, key_serializer="str", value_serializer="json")


@app.agent(source, sink=[sink])
def double(stream):
    for key, value in stream.items():
        yield {"n": value["n"], "doubled": value["n"] * 2, "key": key}
