"""Tasks (shardworker/topology.py): task ids, grouping topic-partitions into tasks and the
numeric task order.  Pure logic."""
from __future__ import annotations

import random

import pytest

from shardworker.topology import group_by_task, task_id, task_partitions, task_sort_key

pytestmark = pytest.mark.timeout(10)

SOURCES = ["orders", "clicks", "users"]


def test_task_id_is_the_source_topics_index_and_the_partition():
    assert task_id(SOURCES, "orders", 0) == "0_0"
    assert task_id(SOURCES, "clicks", 12) == "1_12"
    assert task_id(SOURCES, "users", 3) == "2_3"
    with pytest.raises(ValueError):
        task_id(SOURCES, "other", 0)


def test_task_partitions_is_the_inverse_of_task_id():
    for topic in SOURCES:
        for partition in (0, 1, 9, 10, 123):
            assert task_partitions(SOURCES, task_id(SOURCES, topic, partition)) == [(topic, partition)]


def test_a_topic_with_an_underscore_in_its_name_still_maps_both_ways():
    sources = ["my_topic", "a_b_c"]
    assert task_id(sources, "a_b_c", 7) == "1_7"
    assert task_partitions(sources, "1_7") == [("a_b_c", 7)]


def test_grouping_keeps_each_partition_in_its_own_task_and_drops_foreign_topics():
    got = group_by_task(SOURCES, [("users", 1), ("orders", 0), ("orders", 1), ("elsewhere", 0),
                                  ("clicks", 0), ("users", 1)])
    assert got == {"2_1": [("users", 1), ("users", 1)], "0_0": [("orders", 0)],
                   "0_1": [("orders", 1)], "1_0": [("clicks", 0)]}
    assert group_by_task(SOURCES, []) == {}
    assert group_by_task([], [("orders", 0)]) == {}


def test_sort_key_orders_by_sub_topology_then_partition_numerically():
    ordered = ["0_0", "0_1", "0_2", "0_9", "0_10", "0_11", "0_100", "1_0", "1_2", "2_0", "10_0"]
    shuffled = ordered[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=task_sort_key) == ordered
    assert task_sort_key("3_14") == (3, 14)
    assert sorted(["0_10", "0_9"]) == ["0_10", "0_9"]  # as text the order would be wrong
