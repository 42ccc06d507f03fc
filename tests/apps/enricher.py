"""Test app: a stream–table join through a global table.  Each order is enriched with
its country as the global table ``countries`` holds it (None for a country it lacks).

Topic and group names come from ``SHARDSUP_TEST_PREFIX`` so tests never share them.
"""
import os
import sys
import time

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2)
countries_topic = app.topic(f"{P}-countries", partitions=3, key_serializer="str",
                            value_serializer="json")
orders = app.topic(f"{P}-orders", partitions=4, key_serializer="str", value_serializer="json")
out = app.topic(f"{P}-out", partitions=4, key_serializer="str", value_serializer="json")
countries = app.global_table("countries", topic=countries_topic)


@app.agent(orders, sink=[out])
async def enrich(stream):
    async for order in stream:
        yield {"order": order["id"], "country": countries.get(order["country"])}


HOLD = os.environ.get("SHARDSUP_TEST_HOLD_CATCH_UP")
if HOLD and "supervisor.globalmirror" in sys.modules:
    # Fault injection, in the supervisor only: its mirror writes nothing of the catch-up
    # until the test creates the file HOLD, so the children get their tasks and see the
    # orders while the copy is still empty (an event, not a delay: DESIGN.md, "Tests and
    # the broker").
    from supervisor import globalmirror

    _apply = globalmirror.TableCopy.apply

    def _held_apply(self, records, ends={}):  # type: ignore[no-untyped-def]
        while not self.caught_up and not os.path.exists(HOLD):
            time.sleep(0.05)
        return _apply(self, records, ends)

    globalmirror.TableCopy.apply = _held_apply
