"""Test app: outputs and dead letters larger than the producers' ``message.max.bytes``.

Clients run with ``message.max.bytes`` = 10,000, so a test can go over it with small
records.  ``{"n": n, "pad": size}`` yields an output carrying ``size`` bytes of padding;
``{"n": n, "boom": true, ...}`` raises, so the input itself is dead-lettered (a large
input makes a dead letter too large to send whole); ``{"n": n, "state": size}`` writes
a table value of ``size`` bytes (its changelog record would be too large).  Every other
record writes its ``n`` to the ``seen`` table.  ``SHARDSUP_TEST_GUARANTEE`` picks
the processing guarantee.
"""
import os

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
MESSAGE_MAX_BYTES = 10_000

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2, kafka_config={"message.max.bytes": MESSAGE_MAX_BYTES},
                      processing_guarantee=os.environ.get("SHARDSUP_TEST_GUARANTEE", "at_least_once"))
source = app.topic(f"{P}-in", partitions=2, value_serializer="json")
sink = app.topic(f"{P}-out", partitions=2, value_serializer="json")
seen = app.table("seen")


@app.agent(source, sink=[sink])
def pad(stream):
    for value in stream:
        if value.get("boom"):
            raise ValueError(f"boom on n={value['n']}")
        seen[str(value["n"])] = "s" * value["state"] if value.get("state") else value["n"]
        yield {"n": value["n"], "pad": "x" * value.get("pad", 0)}
