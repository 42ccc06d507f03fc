"""Tasks (shardworker/topology.py): task ids, grouping topic-partitions into tasks and the
numeric task order.  Pure logic."""
from __future__ import annotations

import random

import pytest

from shardworker.topology import SubTopology, Topology, task_sort_key

pytestmark = pytest.mark.timeout(10)

SOURCES = ["orders", "clicks", "users"]
TOPO = Topology.of_sources(SOURCES)


def test_task_id_is_the_source_topics_index_and_the_partition():
    assert TOPO.task_id("orders", 0) == "0_0"
    assert TOPO.task_id("clicks", 12) == "1_12"
    assert TOPO.task_id("users", 3) == "2_3"
    with pytest.raises(ValueError):
        TOPO.task_id("other", 0)


def test_task_partitions_is_the_inverse_of_task_id():
    for topic in SOURCES:
        for partition in (0, 1, 9, 10, 123):
            assert TOPO.task_partitions(TOPO.task_id(topic, partition)) == [(topic, partition)]


def test_a_topic_with_an_underscore_in_its_name_still_maps_both_ways():
    topology = Topology.of_sources(["my_topic", "a_b_c"])
    assert topology.task_id("a_b_c", 7) == "1_7"
    assert topology.task_partitions("1_7") == [("a_b_c", 7)]


def test_grouping_keeps_each_partition_in_its_own_task_and_drops_foreign_topics():
    got = TOPO.group_by_task([("users", 1), ("orders", 0), ("orders", 1), ("elsewhere", 0),
                                  ("clicks", 0), ("users", 1)])
    assert got == {"2_1": [("users", 1), ("users", 1)], "0_0": [("orders", 0)],
                   "0_1": [("orders", 1)], "1_0": [("clicks", 0)]}
    assert TOPO.group_by_task([]) == {}
    assert Topology([]).group_by_task([("orders", 0)]) == {}


def test_sort_key_orders_by_sub_topology_then_partition_numerically():
    ordered = ["0_0", "0_1", "0_2", "0_9", "0_10", "0_11", "0_100", "1_0", "1_2", "2_0", "10_0"]
    shuffled = ordered[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=task_sort_key) == ordered
    assert task_sort_key("3_14") == (3, 14)
    assert sorted(["0_10", "0_9"]) == ["0_10", "0_9"]  # as text the order would be wrong


def test_a_task_owns_its_partition_of_every_source_of_its_sub_topology():
    topology = Topology([SubTopology(0, ("orders",)),
                         SubTopology(1, ("app-by-customer-repartition", "customers"),
                                     ("by_customer", "names"))])
    assert topology.task_id("customers", 3) == "1_3"
    assert topology.task_id("app-by-customer-repartition", 3) == "1_3"
    assert topology.task_partitions("1_3") == [("app-by-customer-repartition", 3), ("customers", 3)]
    assert topology.leaders == ["orders", "app-by-customer-repartition"]
    # the group hands out leader partitions; a task is all of its partitions
    assert topology.whole_tasks([("app-by-customer-repartition", 3), ("orders", 1)]) == [
        ("app-by-customer-repartition", 3), ("customers", 3), ("orders", 1)]
    assert topology.subtopology_of_table("names").index == 1
    with pytest.raises(ValueError):
        Topology([SubTopology(0, ("a",)), SubTopology(1, ("a",))])
