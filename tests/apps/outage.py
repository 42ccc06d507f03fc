"""Test app for broker outages: counts records per key in a table and sends each record's
number and count on.  A record may carry ``pause``: the first time it is seen, the agent
creates ``<pause>.paused`` and waits for ``<pause>.go``, so a test can stop the broker
while a batch is half produced and then let it go on."""
import os
import time

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]

# a test may lengthen the session (the group keeps its partitions through the outage)
# and shorten librdkafka's message timeout (outputs fail while the broker is away)
SESSION_MS = int(os.environ.get("SHARDSUP_TEST_SESSION_MS", "6000"))
MESSAGE_TIMEOUT_MS = os.environ.get("SHARDSUP_TEST_MESSAGE_TIMEOUT_MS")

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=SESSION_MS,
                      commit_interval=0.2,
                      processing_guarantee=os.environ.get("SHARDSUP_TEST_GUARANTEE", "at_least_once"),
                      kafka_config={"message.timeout.ms": int(MESSAGE_TIMEOUT_MS)}
                      if MESSAGE_TIMEOUT_MS else {})
source = app.topic(f"{P}-in", partitions=4, key_serializer="str", value_serializer="json")
out = app.topic(f"{P}-out", partitions=4, key_serializer="str", value_serializer="json")
counts = app.table("counts", default=int)


def first_time(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def wait_for_file(path: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


@app.agent(source, sink=[out])
async def count(stream):
    async for key, value in stream.items():
        pause = value.get("pause")
        if pause and first_time(pause + ".paused"):
            wait_for_file(pause + ".go")
        counts[key] += 1
        yield {"n": value["n"], "count": counts[key]}
