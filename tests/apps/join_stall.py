"""Test app: the stream–table join of :mod:`tests.apps.graph` alone (orders re-keyed by
customer look up ``names``, fed by the customers topic), with fault injection in the
join itself rather than in the re-keying.

Sub-topologies: 0 orders (forwarded), 1 the repartition topic + customers (tables
by_customer, orders_seen, names).  Joining an order of SHARDSUP_TEST_JOIN_STALL_AT
stalls the child that hosts the join task (once per order, after writing its pid to a
marker file in SHARDSUP_TEST_STALL_DIR), so a test can kill a supervisor whose join task
holds a batch that reached no changelog and no commit (an event, not a time: DESIGN.md,
"Tests and the broker")."""
import os
import time

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
STALL_DIR = os.environ.get("SHARDSUP_TEST_STALL_DIR")
STALL_AT = {int(n) for n in os.environ.get("SHARDSUP_TEST_JOIN_STALL_AT", "").split(",") if n}


def stall_once(order_id):
    """Writes this process's pid to the order's marker and stalls, the first time only."""
    marker = os.path.join(STALL_DIR, f"join-stall-{order_id}")
    if not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(marker + ".tmp", marker)
        time.sleep(60)  # the test kills this process's supervisor here


app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2,
                      processing_guarantee=os.environ.get("SHARDSUP_TEST_GUARANTEE", "at_least_once"))
orders = app.topic(f"{P}-orders", partitions=4, value_serializer="json")   # keyed by order id
customers = app.topic(f"{P}-customers", partitions=4, key_serializer="str", value_serializer="json")
out = app.topic(f"{P}-out", partitions=4, key_serializer="json", value_serializer="json")

by_customer = app.table("by_customer", default=int)
orders_seen = app.table("orders_seen", default=int)
names = app.table("names")


def customer_of(order):
    return order["customer"]


@app.agent(orders, sink=[out])
async def spend(stream):
    async for order in stream.group_by(customer_of, name="by-customer"):
        by_customer[order["customer"]] += order["amount"]
        orders_seen[order["customer"]] += 1
        if STALL_DIR and order["id"] in STALL_AT:
            stall_once(order["id"])
        yield {"order": order["id"], "customer": order["customer"],
               "name": names.get(order["customer"])}


@app.agent(customers)
async def keep_names(stream):
    async for key, customer in stream.items():
        names[key] = customer["name"]
