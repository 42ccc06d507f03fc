"""Failed tasks are not lost (issue 11, point 12): a failed task shows its last error in
``shardsup status`` and on ``/health`` (503), is tried again after ``--failed-retry``,
and the app's timers move to the lowest task still running."""
from __future__ import annotations

import json
import urllib.error

import pytest

from supervisor.broker import free_port
from tests.conftest import produce, read_topic
from tests.integration.test_operations import get as http_get
from tests.integration.test_operations import status
from tests.integration.test_supervision import wait_until


def get(url: str):
    """(code, body), or (None, "") while the web server is not listening yet."""
    try:
        return http_get(url)
    except urllib.error.URLError:
        return None, ""


def poison(n: int, marker: str, partition: int = 0):
    return [(b"p", json.dumps({"n": n, "fail_while": marker}).encode(), partition)]


def failed_error(base: str) -> str:
    """The last error /health reports for task 0_0, or "" while it is not failed."""
    code, body = get(base + "/health")
    failed = json.loads(body).get("failed", {}) if code == 503 else {}
    return (failed.get("0_0") or {}).get("last_error") or ""


@pytest.mark.timeout(120)
def test_a_failed_task_reports_its_error_and_is_tried_again_after_the_backoff(
        broker, prefix, start_supervisor, tmp_path):
    port = free_port()
    sup = start_supervisor("tests.apps.failing", "-c", "2", "--max-restarts", "2",
                           "--failed-retry", "5", "--web-port", str(port))
    base = f"http://127.0.0.1:{port}"
    sup.wait_for(lambda: get(base + "/health")[0] == 200, 30, "healthy")
    marker = tmp_path / "poisoned"
    marker.touch()
    produce(broker, f"{prefix}-in", poison(0, str(marker)))

    sup.wait_for(lambda: "poison record 0" in failed_error(base), 60,
                 "/health to answer 503 with the failed task's error")
    shown = status(sup.datadir)
    assert shown.returncode == 0, shown.stderr
    assert "FAILED      0_0: RuntimeError: poison record 0" in shown.stdout, shown.stdout
    marker.unlink()  # the next try succeeds

    sup.wait_for(lambda: get(base + "/health")[0] == 200, 60, "the retried task to run again")
    assert "trying them again" in sup.output()
    out = read_topic(broker, f"{prefix}-out", 1, timeout=30)
    assert [json.loads(m.value())["n"] for m in out] == [0]
    assert sup.stop() == 0


def timer_pids(path: str) -> list:
    try:
        with open(path) as f:
            return [int(line) for line in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.mark.timeout(120)
def test_timers_move_to_the_next_running_task_when_task_0_0_fails(
        broker, prefix, start_supervisor, tmp_path):
    beats = str(tmp_path / "beats")
    sup = start_supervisor("tests.apps.failing", "-c", "2", "--max-restarts", "2",
                           "--failed-retry", "600", env={"SHARDSUP_TEST_TIMER_FILE": beats})
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    sup.wait_for(lambda: len(timer_pids(beats)) >= 3, 30, "the timer to run")
    owners = {pid: tasks for pid, tasks in sup.child_tasks().items()}
    first = next(pid for pid, tasks in owners.items() if "0_0" in tasks)
    other = next(pid for pid, tasks in owners.items() if "0_1" in tasks)
    assert set(timer_pids(beats)) == {first}, "the timer ran outside task 0_0's child"

    marker = tmp_path / "poisoned"
    marker.touch()
    produce(broker, f"{prefix}-in", poison(0, str(marker)))
    sup.wait_for(lambda: "FAILED" in sup.output(), 60, "task 0_0 to fail")
    seen = len(timer_pids(beats))
    sup.wait_for(lambda: len(timer_pids(beats)) >= seen + 3, 30, "the timer to run again")
    assert set(timer_pids(beats)[seen:]) == {other}
    assert sup.stop() == 0


@pytest.mark.timeout(120)
def test_timers_run_in_one_child_of_the_group_with_two_supervisors(
        broker, prefix, start_supervisor, tmp_path):
    """Each supervisor picks its own timer owner, so only the one the group gave task 0_0
    may pick one: with two supervisors sharing the tasks, the timer runs in one child."""
    beats = str(tmp_path / "beats")
    env = {"SHARDSUP_TEST_TIMER_FILE": beats}
    a = start_supervisor("tests.apps.failing", "-c", "2", name="a", env=env)
    a.wait_for(lambda: len(a.child_tasks()) == 2, 30, "supervisor a's children")
    b = start_supervisor("tests.apps.failing", "-c", "2", name="b", env=env)
    both = lambda: sorted(t for s in (a, b) for ts in s.child_tasks().values() for t in ts)  # noqa: E731
    b.wait_for(lambda: b.child_tasks() and both() == ["0_0", "0_1", "0_2", "0_3"], 60,
               "the group to share the tasks between the two supervisors")
    seen = len(timer_pids(beats))
    b.wait_for(lambda: len(timer_pids(beats)) >= seen + 10, 30, "the timer to run")
    holder = next(s for s in (a, b) if any("0_0" in ts for ts in s.child_tasks().values()))
    owner = next(pid for pid, ts in holder.child_tasks().items() if "0_0" in ts)
    assert set(timer_pids(beats)[seen + 5:]) == {owner}, "the timer ran in more than one child"
    assert b.stop() == 0 and a.stop() == 0
