"""Test app for session windows (issue 14): events carry their event time in a field
(``ts``, seconds); sessions of a 10 s gap with a grace of 10 s sum ``n`` per key and send
each closed session's ``{"start", "end", "value"}`` to ``<P>-sessions``.

Fault injection for the kill -9 test (an event, not a time: DESIGN.md, "Tests and the
broker"): processing the event whose ``id`` is in ``SHARDSUP_TEST_STALL_AT`` stalls once,
after writing the child's pid to a marker file in ``SHARDSUP_TEST_STALL_DIR``.
"""
import os
import time

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
STALL_DIR = os.environ.get("SHARDSUP_TEST_STALL_DIR")
STALL_AT = {int(n) for n in os.environ.get("SHARDSUP_TEST_STALL_AT", "").split(",") if n}


def stall_once(name: str) -> None:
    marker = os.path.join(STALL_DIR, f"stall-{name}")  # type: ignore[arg-type]
    if not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(marker + ".tmp", marker)
        time.sleep(60)  # the test kills this process here


app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2,
                      processing_guarantee=os.environ.get("SHARDSUP_TEST_GUARANTEE", "at_least_once"))
events = app.topic(f"{P}-events", partitions=2, key_serializer="str", value_serializer="json",
                   timestamp=lambda v: v["ts"])
closed = app.topic(f"{P}-sessions", partitions=2, key_serializer="json", value_serializer="json")

visits = app.table("visits", default=int).session(10, grace=10).on_close(closed)


@app.agent(events)
def track(stream):
    for key, event in stream.items():
        if STALL_DIR and event.get("id") in STALL_AT:
            stall_once(str(event["id"]))
        visits[key] += event["n"]
