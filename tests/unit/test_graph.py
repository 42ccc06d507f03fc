"""The stream graph (shardworker/graph.py): sub-topologies found by reading the agents'
source, repartition topics, the co-partitioning check.  Pure logic: nothing runs."""
from __future__ import annotations

import pytest

import shardworker
from shardworker.graph import TopologyError, check_copartitioned
from shardworker.topology import SubTopology

pytestmark = pytest.mark.timeout(10)


def test_the_example_app_has_the_sub_topologies_of_kafka_streams():
    from tests.unit.graphapps import shop

    topology = shop.app.topology
    assert topology.subtopologies == [
        SubTopology(0, ("orders",), ("unused",)),         # re-keyed and forwarded; a table
                                                          # no agent uses goes to 0
        SubTopology(1, ("shop-by-customer-repartition", "customers"),
                    ("by_customer", "names")),            # names joined through remember()
        SubTopology(2, ("lines",)),
        SubTopology(3, ("words",), ("word_counts",)),     # fed by send() and by through()
        SubTopology(4, ("audit",)),
    ]
    assert shop.side_effects == []
    repartition = shop.app.topics["shop-by-customer-repartition"]
    assert repartition.like == "orders" and repartition.key_serializer == "str"
    assert shop.spend.regroup.kind == "group_by"
    assert shop.audit_through.regroup.topic == "words"
    # the group subscribes to one topic per sub-topology
    assert topology.leaders == ["orders", "shop-by-customer-repartition", "lines", "words", "audit"]


def test_a_single_topic_app_keeps_task_ids_0_p():
    app = shardworker.App("one", broker="kafka://127.0.0.1:1")
    counts = app.table("counts", default=int)

    @app.agent(app.topic("in"))
    async def count(stream):
        async for key, _v in stream.items():
            counts[key] += 1

    assert app.topology.task_id("in", 3) == "0_3"
    assert app.topology.subtopologies[0].tables == ("counts",)


def test_two_topics_sharing_a_table_are_one_sub_topology_and_others_stay_apart():
    app = shardworker.App("two", broker="kafka://127.0.0.1:1")
    seen = app.table("seen", default=int)

    @app.agent(app.topic("a", "b"))
    async def both(stream):
        async for key, _v in stream.items():
            seen[key] += 1

    @app.agent(app.topic("c"))
    async def stateless(stream):
        async for _v in stream:
            pass

    subs = app.topology.subtopologies
    assert [s.sources for s in subs] == [("a", "b"), ("c",)]
    assert subs[0].tables == ("seen",)


def test_group_by_without_a_literal_name_is_refused_in_one_line():
    app = shardworker.App("bad", broker="kafka://127.0.0.1:1")
    name = "computed"

    @app.agent(app.topic("in"))
    async def rekey(stream):
        async for _v in stream.group_by(lambda v: v, name=name):
            pass

    with pytest.raises(TopologyError, match="group_by needs name="):
        app.topology


def test_an_agent_that_re_keys_twice_is_refused():
    app = shardworker.App("twice", broker="kafka://127.0.0.1:1")

    @app.agent(app.topic("in"))
    async def rekey(stream):
        async for _v in stream.group_by(lambda v: v, name="x").group_by(lambda v: v, name="y"):
            pass

    with pytest.raises(TopologyError, match="re-keys 2 times"):
        app.topology


def test_copartitioning_is_checked_per_sub_topology():
    from tests.unit.graphapps import shop

    topology = shop.app.topology
    counts = {"orders": 8, "shop-by-customer-repartition": 8, "customers": 8, "lines": 3,
              "words": 8, "audit": 8}
    assert check_copartitioned(topology, counts) is None
    problem = check_copartitioned(topology, {**counts, "customers": 4})
    assert problem is not None and "\n" not in problem
    assert "shop-by-customer-repartition[8], customers[4]" in problem
