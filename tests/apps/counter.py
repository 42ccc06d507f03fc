"""Test app: count and sum per key in tables; a tumbling and a hopping window; each
record's number goes on to ``<prefix>-out`` (the outputs whose delivery tests check).

Input records are keyed by user (str) and partitioned by Java Kafka's partitioner, as a
table needs: a key's counts live in the task of the key's partition.
"""
import os

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
WORK_SECONDS = float(os.environ.get("SHARDSUP_TEST_WORK_US", "0")) / 1e6

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2,
                      processing_guarantee=os.environ.get("SHARDSUP_TEST_GUARANTEE", "at_least_once"))
orders = app.topic(f"{P}-in", partitions=4, key_serializer="str", value_serializer="json")
out = app.topic(f"{P}-out", partitions=4, key_serializer="str", value_serializer="json")
counts = app.table("counts", default=int)
sums = app.table("sums", default=int)
per_minute = app.table("per_minute", default=int).tumbling(60.0, expires=3600.0)
hopping = app.table("hopping", default=int).hopping(60.0, 30.0)


@app.agent(orders, sink=[out])
async def count(stream):
    async for key, order in stream.items():
        counts[key] += 1
        sums[key] += order["amount"]          # a str amount raises TypeError: dead-lettered
        per_minute[key] += order["amount"]
        hopping[key] += 1
        if WORK_SECONDS:
            import time

            until = time.perf_counter() + WORK_SECONDS
            while time.perf_counter() < until:
                pass
        yield order.get("n")


if os.environ.get("SHARDSUP_TEST_ABORT_FIRST_COMMIT"):
    # Fault injection for the rewind test: the first transaction of each task that carries
    # input offsets is aborted on the real broker, as when it refuses a commit because the
    # group moved on.  An event, not "the Nth commit": every task that gets records makes
    # such a commit, however fast the machine (DESIGN.md, "Tests and the broker").
    from shardworker import transactions

    _commit = transactions.TaskTransaction.commit
    _aborted = set()

    def _commit_or_abort(self, offsets, group_metadata):
        if offsets and self.task not in _aborted and self.open:
            _aborted.add(self.task)
            self.abort()
            raise transactions.TransactionAborted(f"task {self.task}: transaction aborted: planted")
        return _commit(self, offsets, group_metadata)

    transactions.TaskTransaction.commit = _commit_or_abort
