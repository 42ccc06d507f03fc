"""A broker outage is not a crash (issue 11, point 7): with the broker process stopped
(SIGSTOP) while a batch is half produced, children wait and heartbeat, no task ends
FAILED, the supervisor keeps answering and never exits, and within 60 s of the broker's
return every task runs again with exact counts: under both guarantees.  Exactly-once, every call
of a task's transaction waits in slices with heartbeats, and a transaction that outlived
the outage is aborted and its records read again.  Tansu shows aborted records to
``read_committed`` readers, so exactness is checked on the table (``shardsup table``) and
the group's committed offsets, not on output counts (DESIGN.md, "Tests and the broker")."""
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
from tests.conftest import ROOT, Supervisor, committed_offsets, dump_of, produce, read_topic
from tests.integration.test_operations import status

#: How the outputs are read.  On tansu, read_uncommitted: tansu shows aborted records to
#: read_committed readers anyway, and it never aborts a transaction that its producer
#: abandoned (Kafka does after transaction.timeout.ms), so after an outage one such
#: transaction can hold a read_committed reader back for good (DESIGN.md, "Tests and the
#: broker").  On a real Kafka (SHARDSUP_TEST_BROKER), read_committed.
OUTPUT_ISOLATION = "read_committed" if os.environ.get("SHARDSUP_TEST_BROKER") else "read_uncommitted"
BACK_WITHIN = 60.0     # seconds after its return by which every task must run again
KEYS, PER_KEY = 50, 40


def task_states(datadir: str) -> Dict[str, str]:
    """Task → state from the status socket ({} when it does not answer)."""
    result = status(datadir, "--json")
    if result.returncode != 0:
        return {}
    return {task: info["state"] for task, info in json.loads(result.stdout)["tasks"].items()}


def outage(broker: EmbeddedBroker, prefix: str, tmp_path, seconds: float, args: List[str],
           env: Dict[str, str], commit_within: float = 30.0) -> str:
    """Runs the counting app, stops the broker for ``seconds`` once the agent is half
    way through a batch, and checks what must hold (every input committed within
    ``commit_within`` seconds of the outputs); returns the supervisor's log."""
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
        # one record per key first, committed on every partition before the outage: a task
        # that never committed would, on tansu, restore its aborted changelog records (which
        # tansu shows to read_committed readers) as if its offsets had been lost
        produce(bootstrap, f"{prefix}-in", batch[:KEYS])
        sup.wait_for(lambda: sum(max(0, o) for o in committed_offsets(
            bootstrap, prefix, f"{prefix}-in", 4).values()) == KEYS, 60, "the first records committed")
        produce(bootstrap, f"{prefix}-in", batch[KEYS:])
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
        out = read_topic(bootstrap, f"{prefix}-out", 0, timeout=90, isolation=OUTPUT_ISOLATION,
                         until=lambda msgs: wanted <= {json.loads(m.value())["n"] for m in msgs})
        assert {json.loads(m.value())["n"] for m in out} == wanted
        # every input is committed, none past the end (exactly-once: in the transactions)
        try:
            sup.wait_for(lambda: sum(committed_offsets(bootstrap, prefix, f"{prefix}-in", 4).values())
                         == total, commit_within, "every input committed")
        except AssertionError:
            raise AssertionError(
                f"not every input committed: offsets "
                f"{committed_offsets(bootstrap, prefix, f'{prefix}-in', 4)} of {total} "
                f"(read_uncommitted: {committed_offsets(bootstrap, prefix, f'{prefix}-in', 4, 'read_uncommitted')}); "
                f"where the processes are:\n{dump_of(sup)}") from None
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


#: The exactly-once variants on tansu: after transactions failed in the outage, tansu may
#: leave the group's offsets behind the transactions that committed, for good (seen: the
#: children's transactions committed up to offsets 520/480 and the group's offsets stayed
#: at 13/12, read_committed and read_uncommitted alike, for two minutes; seen in the long
#: outage too, once in seven runs: every output there, both children idle, the offsets at
#: 13/12).  Kafka would refuse such a commit, or store it.  So a failure there is expected
#: on tansu (it runs, and prints the offsets and every process's stack); against Kafka it
#: must pass.
TANSU_EOS_OUTAGE = pytest.mark.xfail(
    not os.environ.get("SHARDSUP_TEST_BROKER"), strict=False,
    reason="tansu may leave the group's offsets behind committed transactions after an "
           "outage that failed transactions (DESIGN.md, \"Tests and the broker\")")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("guarantee", [
    "at_least_once", pytest.param("exactly_once", marks=TANSU_EOS_OUTAGE)])
def test_a_long_broker_outage_is_waited_out_with_exact_counts(own_broker, prefix, tmp_path,
                                                              guarantee):
    """Longer than the group session (6 s): the partitions are lost and taken back.  The
    issue's 90 s at least once; exactly-once 30 s, also longer than its transactions'
    timeout (10 s), so the broker aborts the open ones (and the suite stays short)."""
    seconds = 90.0 if guarantee == "at_least_once" else 30.0
    log = outage(own_broker, prefix, tmp_path, seconds, ["--child-timeout", "20", "--max-restarts", "2"],
                 {"SHARDSUP_TEST_GUARANTEE": guarantee})
    assert "lost partitions" in log


@pytest.mark.timeout(360)
@pytest.mark.parametrize("guarantee", [
    "at_least_once", pytest.param("exactly_once", marks=TANSU_EOS_OUTAGE)])
def test_outputs_timing_out_in_an_outage_restart_children_without_counting_crashes(
        own_broker, prefix, tmp_path, guarantee):
    """Within the session (30 s): the group keeps its partitions and the children's
    outputs time out (message.timeout.ms 3 s).  At least once, the children exit to be
    restarted, again and again: never counted as crashes, so --max-restarts 2 never marks
    a task FAILED.  Exactly-once, the timed-out outputs fail their transactions; the
    children wait for the broker to abort them with heartbeats (before, each call blocked
    up to 30 s and the supervisor killed the children as hung: counted crashes), give up
    after ABORT_WAIT with exit 75 (uncounted), and the restarted children's
    init_transactions aborts them.

    On tansu a child's ``send_offsets_to_transaction`` after such an outage can go
    unanswered with the broker back (and hold back the group's other transactional offset
    commits meanwhile): the child gives up after BROKER_WAIT with exit 75 and its
    successor's init_transactions clears it, so the commits may take that long here."""
    from shardworker.broker_wait import BROKER_WAIT

    log = outage(own_broker, prefix, tmp_path, 25.0, ["--child-timeout", "20", "--max-restarts", "2"],
                 {"SHARDSUP_TEST_SESSION_MS": "30000", "SHARDSUP_TEST_MESSAGE_TIMEOUT_MS": "3000",
                  "SHARDSUP_TEST_GUARANTEE": guarantee}, commit_within=BROKER_WAIT + 60)
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
