"""A broker outage is not a crash (issue 11, point 7): with the broker process stopped
(SIGSTOP) while a batch is half produced, children wait and heartbeat, no task ends
FAILED, the supervisor keeps answering and never exits, and within 60 s of the broker's
return every task runs again with exact counts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

import pytest

from supervisor.broker import EmbeddedBroker
from tests.conftest import ROOT, Supervisor, produce, read_topic
from tests.test_operations import status

BACK_WITHIN = 60.0     # seconds after its return by which every task must run again
KEYS, PER_KEY = 50, 40


def task_states(datadir: str) -> Dict[str, str]:
    """Task → state from the status socket ({} when it does not answer)."""
    result = status(datadir, "--json")
    if result.returncode != 0:
        return {}
    return {task: info["state"] for task, info in json.loads(result.stdout)["tasks"].items()}


def outage(broker: EmbeddedBroker, prefix: str, tmp_path, seconds: float, args: List[str],
           env: Dict[str, str]) -> str:
    """Runs the counting app, stops the broker for ``seconds`` once the agent is half
    way through a batch, and checks what must hold; returns the supervisor's log."""
    bootstrap = broker.bootstrap
    assert broker.proc is not None
    sup = Supervisor("tests.apps.outage", bootstrap, prefix, str(tmp_path / "a"),
                     ["-c", "2", *args], env)
    try:
        sup.wait_for(lambda: len(task_states(sup.datadir)) == 4, 90, "four tasks placed")
        pause = str(tmp_path / "pause")
        total = KEYS * PER_KEY
        batch = [(f"u{n % KEYS}".encode(), json.dumps({"n": n}).encode(), None) for n in range(total)]
        half = total // 2
        batch[half] = (f"u{half % KEYS}".encode(), json.dumps({"n": half, "pause": pause}).encode(), None)
        produce(bootstrap, f"{prefix}-in", batch)
        sup.wait_for(lambda: os.path.exists(pause + ".paused"), 60, "the agent to reach the marker")

        os.kill(broker.proc.pid, signal.SIGSTOP)  # the outage begins with a batch half produced
        stopped = time.monotonic()
        open(pause + ".go", "w").close()
        answered_during = False
        while time.monotonic() - stopped < seconds:
            assert sup.proc.poll() is None, f"the supervisor exited in the outage:\n{sup.output()[-3000:]}"
            if not answered_during and time.monotonic() - stopped > seconds / 2:
                answered_during = status(sup.datadir).returncode == 0
            time.sleep(0.5)
        os.kill(broker.proc.pid, signal.SIGCONT)
        back = time.monotonic()

        sup.wait_for(lambda: set(task_states(sup.datadir).values()) == {"running"}, BACK_WITHIN,
                     "every task RUNNING after the broker came back")
        print(f"every task running {time.monotonic() - back:.1f}s after the broker came back")
        assert answered_during, "the status socket did not answer during the outage"
        wanted = set(range(total))
        out = read_topic(bootstrap, f"{prefix}-out", 0, timeout=90,
                         until=lambda msgs: wanted <= {json.loads(m.value())["n"] for m in msgs})
        assert {json.loads(m.value())["n"] for m in out} == wanted
        log = sup.output()
        assert "FAILED" not in log and "sent no heartbeat" not in log, log[-3000:]
        assert "supervisor failed" not in log and "died with code" not in log, log[-3000:]
        assert sup.stop() == 0
    finally:
        sup.kill()
    table = subprocess.run([sys.executable, "-m", "supervisor", "table", "-A", "tests.apps.outage",
                            "--datadir", sup.datadir, "counts"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "SHARDSUP_TEST_PREFIX": prefix, **env})
    assert table.returncode == 0, table.stderr
    assert json.loads(table.stdout) == {f"u{k}": PER_KEY for k in range(KEYS)}
    return sup.output()


@pytest.mark.timeout(300)
def test_a_90_second_broker_outage_is_waited_out_with_exact_counts(own_broker, prefix, tmp_path):
    """Longer than the group session (6 s): the partitions are lost and taken back."""
    log = outage(own_broker, prefix, tmp_path, 90.0, ["--child-timeout", "20", "--max-restarts", "2"], {})
    assert "lost partitions" in log


@pytest.mark.timeout(200)
def test_outputs_timing_out_in_an_outage_restart_children_without_counting_crashes(
        own_broker, prefix, tmp_path):
    """Within the session (30 s): the group keeps its partitions, the children's outputs
    time out (message.timeout.ms 3 s) and they exit to be restarted, again and again:
    never counted as crashes, so --max-restarts 2 never marks a task FAILED."""
    log = outage(own_broker, prefix, tmp_path, 25.0, ["--child-timeout", "20", "--max-restarts", "2"],
                 {"SHARDSUP_TEST_SESSION_MS": "30000", "SHARDSUP_TEST_MESSAGE_TIMEOUT_MS": "3000"})
    assert "the broker is unreachable" in log and "not counted as a crash" in log
    assert "lost partitions" not in log


@pytest.mark.timeout(90)
def test_the_final_commit_gives_up_on_a_stopped_broker_within_its_wait(own_broker, prefix):
    """A shutdown during an outage must end: the member's last commit waits for the
    broker's confirmation only so long (a synchronous commit would wait for the broker)."""
    import shardworker
    from supervisor.membership import GroupMember
    from tests.conftest import committed_offsets, create_topic

    assert own_broker.proc is not None
    topic = f"{prefix}-in"
    create_topic(own_broker.bootstrap, topic, 1)
    app = shardworker.App(prefix, broker=f"kafka://{own_broker.bootstrap}")
    member = GroupMember(app, own_broker.bootstrap, print, print, print)
    try:
        assert member.commit_within({(topic, 0): 5}, timeout=20)
        os.kill(own_broker.proc.pid, signal.SIGSTOP)
        began = time.monotonic()
        assert not member.commit_within({(topic, 0): 6}, timeout=3)
        assert time.monotonic() - began < 6
        os.kill(own_broker.proc.pid, signal.SIGCONT)
    finally:
        os.kill(own_broker.proc.pid, signal.SIGCONT)
        member.close()
    assert committed_offsets(own_broker.bootstrap, prefix, topic, 1)[0] in (5, 6)
