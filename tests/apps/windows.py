"""Test app for windows and time (issue 14): events carry their event time in a field
(``ts``, seconds); tumbling windows of 10 s with a grace of 5 s sum ``n`` per key
(``sums``: final records to ``<P>-finals``, the sink form) and count records per key
(``counts``: final records through a callback to ``<P>-count-finals``).  Late records
are dead-lettered (``on_late="dlq"``) to ``<P>-tally-dlq``.

Fault injection for the kill -9 test (events, not times: DESIGN.md, "Tests and the
broker"): processing an event whose ``id`` is in ``SHARDSUP_TEST_STALL_AT``, or closing
the ``counts`` window of a start (seconds) in ``SHARDSUP_TEST_CLOSE_STALL_AT``, stalls
once, after writing the child's pid to a marker file in ``SHARDSUP_TEST_STALL_DIR``.
"""
import os
import time

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
STALL_DIR = os.environ.get("SHARDSUP_TEST_STALL_DIR")
STALL_AT = {int(n) for n in os.environ.get("SHARDSUP_TEST_STALL_AT", "").split(",") if n}
CLOSE_STALL_AT = {int(n) for n in os.environ.get("SHARDSUP_TEST_CLOSE_STALL_AT", "").split(",")
                  if n}


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
finals = app.topic(f"{P}-finals", partitions=2, key_serializer="json", value_serializer="json")
count_finals = app.topic(f"{P}-count-finals", partitions=2, key_serializer="json",
                         value_serializer="json")


def count_closed(key, window, value):
    if STALL_DIR and int(window[0]) in CLOSE_STALL_AT:
        stall_once(f"close-{int(window[0])}")
    return {"start": window[0], "end": window[1], "value": value}


sums = app.table("sums", default=int).tumbling(10, grace=5, on_late="dlq").on_close(finals)
counts = app.table("counts", default=int).tumbling(10, grace=5).on_close(
    count_closed, sink=count_finals)


@app.agent(events)
def tally(stream):
    for key, event in stream.items():
        if STALL_DIR and event.get("id") in STALL_AT:
            stall_once(str(event["id"]))
        sums[key] += event["n"]
        counts[key] += 1
