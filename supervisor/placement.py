"""Where tasks run: which child hosts which task (pure logic, no processes)."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from shardworker.topology import task_sort_key

#: the task whose holder runs the group's timers (one supervisor of the group holds it)
TIMER_TASK = "0_0"


def place_tasks(new_tasks: Sequence[str], hosted: Dict[int, Sequence[str]],
                max_children: int) -> Tuple[Dict[int, List[str]], List[List[str]]]:
    """Spreads ``new_tasks`` over the children, starting new ones up to ``max_children``.

    ``hosted`` maps each running child to the tasks it has.  Returns the new tasks for
    existing children and the task lists of the children to start.  Tasks that already run
    stay where they are (only tasks that move between members are ever stopped); new ones
    go to the least-loaded child, and a child is started whenever there are more tasks
    than children and the cap allows, so ``-c N`` with N or more tasks runs N children.
    """
    total = sum(len(tasks) for tasks in hosted.values()) + len(new_tasks)
    to_start = max(0, min(max_children, total) - len(hosted))
    loads: List[Tuple[int, int, int]] = []  # (load, order, slot); slot < 0 = new child
    for order, (child, tasks) in enumerate(sorted(hosted.items())):
        loads.append((len(tasks), order, child))
    for n in range(to_start):
        loads.append((0, len(hosted) + n, -1 - n))
    for_existing: Dict[int, List[str]] = {}
    for_new: List[List[str]] = [[] for _ in range(to_start)]
    for task in sorted(new_tasks, key=task_sort_key):
        loads.sort()
        load, order, slot = loads[0]
        if slot >= 0:
            for_existing.setdefault(slot, []).append(task)
        else:
            for_new[-1 - slot].append(task)
        loads[0] = (load + 1, order, slot)
    return for_existing, [tasks for tasks in for_new if tasks]


def choose_timer_owner(running: Dict[int, Sequence[str]], held: Iterable[str]) -> Optional[int]:
    """The child that runs the app's timers: the one hosting the lowest task among the
    children that are running (``running`` maps child index to its tasks), on the one
    supervisor of the group that holds task ``0_0`` (``held``: every task assigned to
    this supervisor, failed ones included).

    Timers run once per group (DESIGN.md, "Failure of a task"), so exactly one child of
    the group is told to run them.  The group gives task ``0_0`` to one supervisor,
    which makes it the owner; when the child of ``0_0`` has failed, the timers move to
    that supervisor's next running task instead of stopping.  None when this
    supervisor does not hold ``0_0`` or no child of it runs a task.
    """
    if TIMER_TASK not in held:
        return None
    owners = [(min(task_sort_key(t) for t in tasks), index)
              for index, tasks in running.items() if tasks]
    return min(owners)[1] if owners else None
