"""Crontab jobs and startup tasks (issue 14, point 7): a crontab job fires in one process
only, with two supervisors in the group, and never twice for one scheduled time, also
while task 0_0 moves between them; it goes on in another child when task 0_0 fails; a
startup task runs once in each process that gets the timers role."""
from __future__ import annotations

from collections import Counter
from typing import List, Tuple

import pytest

from tests.conftest import produce
from tests.integration.test_failed_tasks import poison


def lines(path: str) -> List[List[str]]:
    try:
        with open(path) as f:
            return [line.split() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def cron_fires(path: str) -> List[Tuple[int, int]]:
    """(pid, scheduled second) of every crontab fire so far, in order."""
    return [(int(w[1]), int(w[2])) for w in lines(path) if w[0] == "cron"]


def task_pids(path: str) -> List[int]:
    return [int(w[1]) for w in lines(path) if w[0] == "task"]


def assert_once_per_time(path: str) -> None:
    twice = {t: n for t, n in Counter(t for _pid, t in cron_fires(path)).items() if n > 1}
    assert not twice, f"scheduled times fired more than once: {twice}\n{cron_fires(path)}"


@pytest.mark.timeout(120)
def test_a_crontab_job_fires_in_one_process_only_with_two_supervisors(
        broker, prefix, start_supervisor, tmp_path):
    fired = str(tmp_path / "fired")
    env = {"SHARDSUP_TEST_CRON_FILE": fired}
    a = start_supervisor("tests.apps.failing", "-c", "2", name="a", env=env)
    a.wait_for(lambda: len(a.child_tasks()) == 2, 30, "supervisor a's children")
    a.wait_for(lambda: len(cron_fires(fired)) >= 2, 30, "the crontab job to fire")
    b = start_supervisor("tests.apps.failing", "-c", "2", name="b", env=env)
    both = lambda: sorted(t for s in (a, b) for ts in s.child_tasks().values() for t in ts)  # noqa: E731
    b.wait_for(lambda: b.child_tasks() and both() == ["0_0", "0_1", "0_2", "0_3"], 60,
               "the group to share the tasks between the two supervisors")
    seen = len(cron_fires(fired))
    b.wait_for(lambda: len(cron_fires(fired)) >= seen + 6, 30, "the job to fire again")
    holder = next(s for s in (a, b) if any("0_0" in ts for ts in s.child_tasks().values()))
    owner = next(pid for pid, ts in holder.child_tasks().items() if "0_0" in ts)
    # the move while b joined may have put the job elsewhere for a while: settled, the
    # fires come from task 0_0's child alone, and no time ever fired twice
    assert {pid for pid, _t in cron_fires(fired)[seen + 2:]} == {owner}, cron_fires(fired)
    assert_once_per_time(fired)
    times = [t for _pid, t in cron_fires(fired)]
    assert times == sorted(times) and all(t % 2 == 0 for t in times)
    # the startup task ran once in each process that got the role, before its first fire
    tasks = task_pids(fired)
    assert len(tasks) == len(set(tasks)), tasks
    assert {pid for pid, _t in cron_fires(fired)} <= set(tasks)
    assert b.stop() == 0 and a.stop() == 0
    assert_once_per_time(fired)


@pytest.mark.timeout(120)
def test_a_crontab_job_goes_on_in_another_child_when_task_0_0_fails(
        broker, prefix, start_supervisor, tmp_path):
    fired = str(tmp_path / "fired")
    sup = start_supervisor("tests.apps.failing", "-c", "2", "--max-restarts", "2",
                           "--failed-retry", "600", env={"SHARDSUP_TEST_CRON_FILE": fired})
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    sup.wait_for(lambda: len(cron_fires(fired)) >= 2, 30, "the crontab job to fire")
    owners = sup.child_tasks()
    first = next(pid for pid, tasks in owners.items() if "0_0" in tasks)
    other = next(pid for pid, tasks in owners.items() if "0_1" in tasks)
    assert {pid for pid, _t in cron_fires(fired)} == {first} and task_pids(fired) == [first]

    marker = tmp_path / "poisoned"
    marker.touch()
    produce(broker, f"{prefix}-in", poison(0, str(marker)))
    sup.wait_for(lambda: "FAILED" in sup.output(), 60, "task 0_0 to fail")
    seen = len(cron_fires(fired))
    sup.wait_for(lambda: len(cron_fires(fired)) >= seen + 3, 30, "the job to fire again")
    assert {pid for pid, _t in cron_fires(fired)[seen:]} == {other}
    # once per process that got the role: the new holder too (restarts of 0_0's child
    # between its crashes held it for a moment, each a process of its own)
    tasks = task_pids(fired)
    assert tasks[0] == first and other in tasks and len(tasks) == len(set(tasks)), tasks
    assert_once_per_time(fired)
    assert sup.stop() == 0
