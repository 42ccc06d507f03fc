"""Test app: doubles ``n``; raises on ``{"boom": true}``; sink keyed like the input.

Topic and group names come from ``SHARDSUP_TEST_PREFIX`` so tests never share them.
"""
import os
import time

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
PARTITIONS = int(os.environ.get("SHARDSUP_TEST_PARTITIONS", "4"))
# busy-work per record, so that a test can act while the stream is still flowing
WORK_SECONDS = float(os.environ.get("SHARDSUP_TEST_WORK_US", "0")) / 1e6

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2)
source = app.topic(f"{P}-in", partitions=PARTITIONS, value_serializer="json")
sink = app.topic(f"{P}-out", partitions=PARTITIONS, value_serializer="json")


@app.agent(source, sink=[sink])
async def double(stream):
    async for value in stream:
        if WORK_SECONDS:
            until = time.perf_counter() + WORK_SECONDS
            while time.perf_counter() < until:
                pass
        if value.get("boom"):
            raise ValueError(f"boom on n={value['n']}")
        yield {"n": value["n"], "doubled": value["n"] * 2}
