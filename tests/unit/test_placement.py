"""Where tasks run (supervisor/placement.py): placing new tasks on children and choosing
the child that runs the group's timers.  Pure logic."""
from __future__ import annotations

import itertools
from typing import Dict, List, Sequence

import pytest

from shardworker.topology import task_sort_key
from supervisor.placement import TIMER_TASK, choose_timer_owner, place_tasks

pytestmark = pytest.mark.timeout(10)


def placed(hosted: Dict[int, Sequence[str]], new: Sequence[str], cap: int) -> List[List[str]]:
    """Every child's tasks after placing ``new``: running children (by index), then the
    children to start, in order."""
    existing, started = place_tasks(new, hosted, cap)
    after = [list(hosted[c]) + existing.get(c, []) for c in sorted(hosted)]
    return after + started


def test_nothing_to_place_starts_nothing():
    assert place_tasks([], {}, 4) == ({}, [])
    assert place_tasks([], {0: ["0_0"], 1: ["0_1"]}, 4) == ({}, [])


def test_tasks_are_placed_in_numeric_order_round_robin():
    existing, new = place_tasks(["0_10", "0_2", "0_1", "0_0", "1_0", "0_3"], {}, 3)
    assert existing == {}
    assert new == [["0_0", "0_3"], ["0_1", "0_10"], ["0_2", "1_0"]]


def test_a_cap_of_one_puts_every_task_in_one_child():
    assert place_tasks(["0_1", "0_0", "0_2"], {}, 1) == ({}, [["0_0", "0_1", "0_2"]])
    assert place_tasks(["0_3"], {0: ["0_0", "0_1", "0_2"]}, 1) == ({0: ["0_3"]}, [])


def test_new_tasks_fill_the_least_loaded_child_first_lowest_index_on_a_tie():
    existing, new = place_tasks(["0_5", "0_6", "0_7"], {0: ["0_0", "0_1", "0_2"], 3: ["0_3"]}, 2)
    assert new == []
    assert existing == {3: ["0_5", "0_6"], 0: ["0_7"]}
    existing, _ = place_tasks(["0_9"], {4: ["0_0"], 2: ["0_1"]}, 2)
    assert existing == {2: ["0_9"]}


def test_more_children_than_tasks_after_revokes_starts_none_and_keeps_every_child():
    existing, new = place_tasks(["0_4"], {0: [], 1: ["0_1"], 2: []}, 2)
    assert new == [] and existing == {0: ["0_4"]}


@pytest.mark.parametrize("cap", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("running,new", [(0, 8), (2, 6), (5, 3), (1, 0), (0, 1), (4, 20)])
def test_placement_keeps_running_tasks_places_each_new_one_once_and_respects_the_cap(
        cap, running, new):
    tasks = [f"0_{p}" for p in range(running + new)]
    # running tasks spread over min(cap, running) children, as a first placement would
    _, first = place_tasks(tasks[:running], {}, cap)
    hosted = dict(enumerate(first))
    existing, started = place_tasks(tasks[running:], hosted, cap)
    assert all(existing.values()) and all(started), "no empty list is handed out"
    assert set(existing) <= set(hosted)
    handed = list(itertools.chain(*existing.values(), *started))
    assert sorted(handed, key=task_sort_key) == tasks[running:]
    assert len(hosted) + len(started) == min(cap, len(tasks))  # -c N with N tasks: N children
    loads = [len(t) for t in placed(hosted, tasks[running:], cap)]
    if running == 0:
        assert max(loads) - min(loads) <= 1, loads  # a first placement is even


def test_timer_owner_needs_task_0_0_on_this_supervisor():
    assert TIMER_TASK == "0_0"
    assert choose_timer_owner({0: ["0_1"], 1: ["0_2"]}, ["0_1", "0_2"]) is None
    assert choose_timer_owner({0: ["0_1"], 1: ["0_2"]}, ["0_2", "0_0", "0_1"]) == 0


def test_timer_owner_orders_tasks_numerically_not_as_text():
    running = {5: ["0_10"], 6: ["0_9", "1_0"], 7: ["0_100"]}
    assert choose_timer_owner(running, ["0_0", "0_9", "0_10", "0_100", "1_0"]) == 6
    assert choose_timer_owner({1: ["1_0"], 2: ["0_11"]}, ["0_0", "0_11", "1_0"]) == 2


def test_timer_owner_skips_children_without_tasks():
    assert choose_timer_owner({0: [], 1: [], 2: ["0_4"]}, ["0_0", "0_4"]) == 2
    assert choose_timer_owner({0: (), 1: []}, ["0_0"]) is None
