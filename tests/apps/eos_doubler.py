"""Test app: the doubler under exactly-once, with an event-triggered kill -9.

``SHARDSUP_TEST_KILL_AFTER_COMMIT=<path>``: the first child whose task commits a
transaction carrying input offsets while ``<path>`` exists removes the file, writes the
offsets its transactions committed to ``<path>.committed`` (JSON ``[topic, partition,
offset]`` rows) and kills itself with SIGKILL right after the commit returns, before it
can report the offsets to the supervisor.  The supervisor's idea of the task's offsets is then behind what the
group committed, deterministically: the situation a restarted child must not repeat
outputs in (DESIGN.md, "Tests and the broker": a fault is triggered by an event).
"""
import os
import signal
import time

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
PARTITIONS = int(os.environ.get("SHARDSUP_TEST_PARTITIONS", "4"))
# busy-work per record, so that records are still flowing when the fault fires
WORK_SECONDS = float(os.environ.get("SHARDSUP_TEST_WORK_US", "0")) / 1e6
KILL_FILE = os.environ.get("SHARDSUP_TEST_KILL_AFTER_COMMIT")

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      processing_guarantee="exactly_once")
source = app.topic(f"{P}-in", partitions=PARTITIONS, value_serializer="json")
sink = app.topic(f"{P}-out", partitions=PARTITIONS, value_serializer="json")


@app.agent(source, sink=[sink])
async def double(stream):
    async for value in stream:
        if WORK_SECONDS:
            until = time.perf_counter() + WORK_SECONDS
            while time.perf_counter() < until:
                pass
        yield {"n": value["n"], "doubled": value["n"] * 2}


if KILL_FILE:
    import json

    from shardworker import transactions

    _commit = transactions.TaskTransaction.commit
    #: what this process's transactions committed: (topic, partition) → next offset
    _committed = {}

    def _commit_then_die(self, offsets, group_metadata):
        _commit(self, offsets, group_metadata)
        _committed.update(offsets)
        if offsets:
            try:
                os.unlink(KILL_FILE)  # only one child wins the file, once
            except FileNotFoundError:
                return
            # what the child committed, for the test: written whole, then the kill
            with open(KILL_FILE + ".tmp", "w") as f:
                json.dump([[t, p, o] for (t, p), o in _committed.items()], f)
            os.rename(KILL_FILE + ".tmp", KILL_FILE + ".committed")
            os.kill(os.getpid(), signal.SIGKILL)

    transactions.TaskTransaction.commit = _commit_then_die
