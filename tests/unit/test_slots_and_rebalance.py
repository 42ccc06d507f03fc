"""Unit tests of the supervisor's slot transitions (supervisor/children.py) and of the
rebalance moves (supervisor/rebalance.py): no broker, no child process.  A slot gets a
stand-in channel and records the signals it would send; the assignment gets a stand-in
host (the arbiter's side) and group member."""
from __future__ import annotations

import signal
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
from confluent_kafka import KafkaError, KafkaException

import shardworker
from shardworker.protocol import EXIT_BROKER_UNAVAILABLE, Message, Stats, decode
from shardworker.topology import Topology
from supervisor.dump import dump_report
from supervisor.children import (BACKOFF_MAX, CRASHED, FAILED, OUTAGE, RESTART, ChildSlot,
                                 RestartPolicy)
from supervisor.rebalance import PLACE_RETRY, Assignment
from supervisor.snapshot import snapshot, status_line

pytestmark = pytest.mark.timeout(10)

POLICY = RestartPolicy(max_crashes=3, crash_window=60.0, failed_retry=300.0)


class FakeChannel:
    """The supervisor's end of a child's socketpair: what was sent (as ``(op, fields)``),
    what comes back (written as the JSON objects the wire carries, decoded as a real
    channel decodes them).  ``answers`` maps an op sent to the messages the child answers
    it with."""

    def __init__(self) -> None:
        self.sent: List[Tuple[str, Dict[str, Any]]] = []
        self.inbox: List[Dict[str, Any]] = []
        self.answers: Dict[str, List[Dict[str, Any]]] = {}
        self.closed = False

    def send(self, message: Message) -> None:
        self.sent.append((message.op, message.fields()))
        self.inbox.extend(self.answers.get(message.op, []))

    def receive(self) -> List[Message]:
        messages, self.inbox = self.inbox, []
        return [decode(m) for m in messages]

    def close(self) -> None:
        self.closed = True

    def ops(self) -> List[str]:
        return [op for op, _ in self.sent]


def live_slot(index: int, tasks: List[str], state: str = "running") -> ChildSlot:
    """A slot as if its process had been spawned: a stand-in channel, signals recorded
    in ``slot.signals`` (nothing is sent to any process)."""
    slot = ChildSlot(index, tasks)
    slot.channel = FakeChannel()  # type: ignore[assignment]
    slot.state = state
    slot.signals = []  # type: ignore[attr-defined]
    slot.signal = lambda signum: slot.signals.append(signum) if slot.alive else None  # type: ignore[method-assign]
    return slot


# -- ChildSlot: messages ------------------------------------------------------------------

def test_reading_a_child_moves_it_to_running_and_returns_its_offset_reports() -> None:
    slot = live_slot(0, ["0_0"], state="starting")
    slot.revoking = True
    slot.channel.inbox = [  # type: ignore[union-attr]
        {"op": "stats", "processed": 5, "errors": 1, "restoring": True},
        {"op": "ready"},
        {"op": "offsets", "offsets": [["in", 0, 10]]},
        {"op": "revoked", "offsets": [["in", 0, 12]]},
        {"op": "failed", "error": "RuntimeError: boom"}]
    reports = slot.read()
    assert reports == [[["in", 0, 10]], [["in", 0, 12]]]
    assert slot.state == "running" and not slot.revoking and slot.restoring
    assert slot.records_total == 5 and slot.errors_total == 1
    assert slot.last_error == "RuntimeError: boom" and slot.error_reported
    assert slot.last_heard > 0
    # "ready" from a slot that is stopping leaves it stopping
    slot.state = "stopping"
    slot.channel.inbox = [{"op": "ready"}]  # type: ignore[union-attr]
    assert slot.read() == [] and slot.state == "stopping"


def test_timers_are_told_only_when_the_wish_changes() -> None:
    slot = live_slot(0, ["0_0"])
    assert slot.run_timers(True) and slot.runs_timers
    assert not slot.run_timers(True)
    assert slot.run_timers(False) and not slot.runs_timers
    assert slot.channel.sent == [("timers", {"run": True}), ("timers", {"run": False})]  # type: ignore[union-attr]


# -- ChildSlot: stopping, killing, exits --------------------------------------------------

def test_a_stop_is_planned_and_its_clean_exit_restarts_at_once() -> None:
    slot = live_slot(0, ["0_0"])
    slot.stop(50.0)
    assert slot.state == "stopping" and slot.stop_requested == 50.0
    assert slot.signals == [signal.SIGTERM]  # type: ignore[attr-defined]
    channel = slot.channel
    assert slot.exited() is True  # planned
    assert slot.state == "down" and slot.channel is None and channel.closed  # type: ignore[union-attr]
    assert slot.after_exit(0, 51.0, planned=True, policy=POLICY) == (RESTART, 0.0)
    assert slot.respawn_at == 51.0 and slot.crashes == []
    assert not slot.respawn_due(50.9)
    assert slot.respawn_due(51.0) and slot.restarts == 1


def test_a_stop_without_a_signal_leaves_the_signal_to_the_caller() -> None:
    slot = live_slot(0, ["0_0"])
    assert slot.retire(7.0, None)  # still a process to reap
    assert slot.retiring and slot.state == "stopping" and slot.signals == []  # type: ignore[attr-defined]
    down = ChildSlot(1, ["0_1"])
    assert not down.retire(7.0)  # nothing to wait for: the caller drops it
    assert down.retiring and down.state == "down"


def test_a_killed_stop_that_was_planned_is_not_a_crash_but_an_unplanned_kill_is() -> None:
    slot = live_slot(0, ["0_0"])
    slot.revoking = True
    slot.kill(planned=True)  # lost tasks not given back in time
    assert slot.state == "stopping" and slot.signals == [signal.SIGKILL]  # type: ignore[attr-defined]
    assert slot.after_exit(-9, 10.0, planned=slot.exited(), policy=POLICY)[0] == RESTART
    other = live_slot(1, ["0_1"])
    other.revoking = True
    other.kill()
    assert other.state == "running"
    outcome, delay = other.after_exit(-9, 10.0, planned=other.exited(), policy=POLICY)
    assert (outcome, delay) == (CRASHED, 0.1) and other.last_error == "killed by signal 9"


def test_crashes_back_off_then_fail_and_an_outage_never_counts() -> None:
    slot = ChildSlot(0, ["0_0"])
    slot.started_at = 100.0
    assert slot.after_exit(1, 101.0, planned=False, policy=POLICY) == (CRASHED, 0.1)
    assert slot.respawn_at == pytest.approx(101.1)
    assert slot.after_exit(EXIT_BROKER_UNAVAILABLE, 102.0, planned=False, policy=POLICY) == (OUTAGE, 0.1)
    assert len(slot.crashes) == 1
    assert slot.after_exit(1, 103.0, planned=False, policy=POLICY) == (CRASHED, 0.2)
    assert slot.after_exit(1, 104.0, planned=False, policy=POLICY) == (FAILED, None)
    assert slot.state == "failed" and not slot.alive and slot.retry_at == 404.0
    assert slot.respawn_at is None and slot.last_error == "exited with code 1"
    assert slot.exited() is False and slot.state == "failed"  # a late reap keeps it failed
    assert not slot.respawn_due(1000.0)  # failed: only its retry starts it
    assert slot.retry_due(404.0) and slot.respawn_at == 404.0 and slot.crashes == []
    assert slot.respawn_due(404.0)


def test_the_outage_backoff_doubles_up_to_its_cap() -> None:
    slot = ChildSlot(0, ["0_0"])
    delays = [slot.after_exit(EXIT_BROKER_UNAVAILABLE, float(n), False, POLICY)[1] for n in range(10)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8] and delays[-1] == BACKOFF_MAX
    assert slot.crashes == [] and slot.state == "down"


def test_hangs_without_progress_fail_the_slot_however_long_each_lived() -> None:
    slot = live_slot(0, ["0_0"])
    for n in range(3):
        slot.started_at = slot.last_heard = 1000.0 * n  # long-lived: the window alone forgives
        assert slot.silent_for(1000.0 * n + 90) == 90
        slot.hung(1000.0 * n + 90)
        assert slot.last_error == "no heartbeat for 90s" and slot.last_heard == 1000.0 * n + 90
        outcome, _ = slot.after_exit(-9, 1000.0 * n + 91, planned=slot.exited(), policy=POLICY)
        if n < 2:
            assert outcome == CRASHED and slot.hangs == n + 1
            slot.state = "running"
    assert outcome == FAILED and slot.signals == [signal.SIGKILL] * 3  # type: ignore[attr-defined]


def test_progress_between_hangs_starts_the_count_again() -> None:
    slot = live_slot(0, ["0_0"])
    slot.hung(10.0)
    slot.hung(20.0)
    assert slot.hangs == 2
    slot.record_stats(Stats(processed=3))
    slot.hung(30.0)
    assert slot.hangs == 1


def test_a_stop_that_takes_too_long_is_killed_once_per_timeout() -> None:
    slot = live_slot(0, ["0_0"])
    assert not slot.stop_overdue(100.0, 30.0)  # not stopping
    slot.stop(100.0)
    assert not slot.stop_overdue(130.0, 30.0)
    assert slot.stop_overdue(130.5, 30.0) and slot.stop_requested == 130.5
    assert not slot.stop_overdue(140.0, 30.0)
    assert slot.signals == [signal.SIGTERM, signal.SIGKILL]  # type: ignore[attr-defined]
    assert slot.silent_for(1e9) == 0.0  # a stopping child owes no heartbeat


def test_a_hup_restarts_live_slots_and_brings_back_failed_ones_at_once() -> None:
    live = live_slot(0, ["0_0"])
    live.crashes = [1.0, 2.0]
    live.restart(5.0)
    assert live.state == "stopping" and live.signals == [signal.SIGTERM] and live.crashes == []  # type: ignore[attr-defined]
    failed = ChildSlot(1, ["0_1"])
    failed.fail(1.0, 300.0)
    failed.restart(5.0)
    assert failed.state == "down" and failed.respawn_at == 5.0 and failed.respawn_due(5.0)


# -- snapshot ----------------------------------------------------------------------------

def test_the_snapshot_shows_restoring_and_failed_tasks() -> None:
    restoring = live_slot(0, ["0_0"])
    restoring.record_stats(Stats(restoring=True, lag={"0_0": 4}))
    failed = ChildSlot(1, ["0_1", "0_3"])
    failed.last_error = "ValueError: x"
    failed.fail(now=100.0, retry_after=300.0)
    doc = snapshot([failed, restoring], app_id="proj", broker="b:1", datadir="d", started_at=90.0,
                   state="running", group=None, now=150.0)
    assert [c["index"] for c in doc["children"]] == [0, 1]  # type: ignore[index]
    assert doc["tasks"] == {  # type: ignore[comparison-overlap]
        "0_0": {"child": 0, "state": "restoring", "lag": 4},
        "0_1": {"child": 1, "state": "failed", "lag": None, "last_error": "ValueError: x", "retry_in_s": 250.0},
        "0_3": {"child": 1, "state": "failed", "lag": None, "last_error": "ValueError: x", "retry_in_s": 250.0}}
    assert doc["supervisor"]["group"]["state"] == "not joined"  # type: ignore[index]
    assert doc["supervisor"]["uptime_s"] == 60.0  # type: ignore[index]
    assert status_line([failed, restoring]) == "1/2 children running, 3 tasks, 0 records/s, FAILED tasks 0_1,0_3"


def test_the_dump_lists_each_childs_tasks_and_offsets(tmp_path) -> None:
    slots = [ChildSlot(1, ["0_1", "0_3"]), ChildSlot(0, ["0_0"]), ChildSlot(2, [])]
    report = dump_report("proj", str(tmp_path), slots, {("in", 0): 5, ("in", 1): 9},
                         Topology.of_sources(["in"]))
    assert report.startswith("shardsup traceback report — app proj, supervisor pid ")
    children = report.split("== child ")[1:]
    assert "\nsub-topologies:\n  sub-topology 0: in\n" in report
    assert [c.splitlines()[:5] for c in children] == [
        ["0 (pid None, state down) ==", "tasks: 0_0", "offsets:", "  0_0 (sub-topology 0): in[0]=5",
         "(not running)"],
        ["1 (pid None, state down) ==", "tasks: 0_1,0_3", "offsets:",
         "  0_1 (sub-topology 0): in[1]=9", "  0_3 (sub-topology 0): in[3]=?"],
        ["2 (pid None, state down) ==", "tasks: -", "offsets: -", "(not running)"]]
    assert (tmp_path / "dump-latest.txt").read_text() == report
    assert len(list((tmp_path / "dumps").iterdir())) == 1


# -- Assignment: a stand-in arbiter and group member -------------------------------------

class FakeMember:
    def __init__(self) -> None:
        self.down = False
        self.start: Dict[Tuple[str, int], int] = {}
        self.commits: List[Dict[Tuple[str, int], int]] = []      # synchronous
        self.soon: List[Dict[Tuple[str, int], int]] = []         # asynchronous
        self.acknowledged: Dict[Tuple[str, int], int] = {}
        self.metadata = b"generation-1"

    def start_offsets(self, keys: List[Tuple[str, int]]) -> Dict[Tuple[str, int], int]:
        if self.down:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return {key: self.start.get(key, 0) for key in keys}

    def commit(self, offsets: Dict[Tuple[str, int], int]) -> bool:
        self.commits.append(dict(offsets))
        return True

    def commit_soon(self, offsets: Dict[Tuple[str, int], int]) -> None:
        self.soon.append(dict(offsets))

    def take_acknowledged(self) -> Dict[Tuple[str, int], int]:
        acknowledged, self.acknowledged = self.acknowledged, {}
        return acknowledged

    def group_metadata(self) -> bytes:
        return self.metadata


class FakeHost:
    """The arbiter's side: slots, a spawn that starts nothing, and a waiting loop that
    reads the stand-in channels and "reaps" whatever was sent a KILL."""

    def __init__(self, max_children: int = 2, shutdown_timeout: float = 0.2) -> None:
        self.slots: Dict[int, ChildSlot] = {}
        self.member: Optional[FakeMember] = FakeMember()
        self.stopping: Optional[str] = None
        self.closing = False
        self.max_children = max_children
        self.shutdown_timeout = shutdown_timeout
        self.assignment: Optional[Assignment] = None
        self.spawned: List[int] = []
        self.exits: Dict[int, bool] = {}   # slot index -> whether its exit was planned
        #: answers the next children give to a revoke (by slot index)
        self.revoke_answers: Dict[int, List[Dict[str, Any]]] = {}
        self.timer_checks = 0   # calls of assign_timers (a revoke ends with one)

    def assign_timers(self) -> None:
        self.timer_checks += 1

    def spawn(self, slot: ChildSlot) -> None:
        slot.channel = FakeChannel()  # type: ignore[assignment]
        slot.channel.answers["revoke"] = self.revoke_answers.get(slot.index, [])  # type: ignore[attr-defined]
        slot.state = "starting"
        slot.signals = []  # type: ignore[attr-defined]
        slot.signal = lambda signum: slot.signals.append(signum) if slot.alive else None  # type: ignore[method-assign]
        self.spawned.append(slot.index)
        assert self.assignment is not None
        self.assignment.assign_new_child(slot)

    def sleep(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.005))

    def read_children(self) -> None:
        assert self.assignment is not None
        for slot in self.slots.values():
            for offsets in slot.read():
                self.assignment.record_offsets(slot, offsets)

    def reap(self) -> None:
        for slot in list(self.slots.values()):
            if slot.alive and signal.SIGKILL in getattr(slot, "signals", []):
                self.exits[slot.index] = slot.exited()


def make(guarantee: str = "at_least_once", partitions: int = 4, **host_args: Any
         ) -> Tuple[Assignment, FakeHost]:
    app = shardworker.App("proj", processing_guarantee=guarantee)
    app.topic("proj-in", partitions=partitions)
    app.agent(app.topics["proj-in"])(lambda stream: stream)
    host = FakeHost(**host_args)
    host.assignment = Assignment(app, host)  # type: ignore[arg-type]
    return host.assignment, host


def keys(*parts: int) -> List[Tuple[str, int]]:
    return [("proj-in", p) for p in parts]


def sent(slot: ChildSlot, op: str) -> List[Dict[str, Any]]:
    return [fields for o, fields in slot.channel.sent if o == op]  # type: ignore[union-attr]


def test_an_assignment_starts_children_with_the_groups_start_offsets() -> None:
    assignment, host = make()
    host.member.start = {("proj-in", 0): 5, ("proj-in", 1): 0, ("proj-in", 2): 9}  # type: ignore[union-attr]
    assignment.on_assign(keys(0, 1, 2))
    assert assignment.joined and host.spawned == [0, 1] and assignment.unplaced == []
    assert host.slots[0].tasks == ["0_0", "0_2"] and host.slots[1].tasks == ["0_1"]
    assert sent(host.slots[0], "assign") == [{"partitions": [("proj-in", 0, 5), ("proj-in", 2, 9)]}]
    assert sent(host.slots[0], "group") == []  # at least once: no group metadata
    # a later assignment goes to the least-loaded existing child, told at once
    host.slots[1].state = "running"
    assignment.on_assign(keys(3))
    assert host.slots[1].tasks == ["0_1", "0_3"] and host.spawned == [0, 1]
    assert sent(host.slots[1], "assign")[-1] == {"partitions": [("proj-in", 3, 0)]}


def test_an_assignment_whose_offsets_time_out_is_placed_on_a_later_turn() -> None:
    assignment, host = make()
    host.member.down = True  # type: ignore[union-attr]
    assignment.on_assign(keys(0, 1))  # inside librdkafka's callback: must not raise
    assert assignment.joined and assignment.unplaced == keys(0, 1) and host.slots == {}
    assert assignment.next_placement > 0
    assignment.place_unplaced()  # too early: not even asked
    host.member.down = False  # type: ignore[union-attr]
    assignment.place_unplaced()
    assert assignment.unplaced == keys(0, 1) and host.slots == {}
    assignment.next_placement -= PLACE_RETRY
    assignment.place_unplaced()
    assert assignment.unplaced == [] and sorted(host.slots) == [0, 1]
    assert assignment.offsets == {k: 0 for k in keys(0, 1)}
    assignment.on_lost(keys(5))  # never placed: nothing to take back, nothing raised
    assert sorted(host.slots) == [0, 1]


def test_a_revoke_before_placement_only_drops_the_partition() -> None:
    assignment, host = make()
    host.member.down = True  # type: ignore[union-attr]
    assignment.on_assign(keys(0, 1))
    assignment.on_revoke(keys(1))
    assert assignment.unplaced == keys(0) and host.member.commits == []  # type: ignore[union-attr]


def test_children_started_ahead_share_the_first_assignment_and_the_spare_ones_stop() -> None:
    # -c 3, all three started while the group was being joined (Arbiter.start_ahead);
    # other supervisors share the group, so this one gets two tasks
    assignment, host = make(max_children=3)
    ahead = [live_slot(i, []) for i in range(3)]
    for slot in ahead:
        host.slots[slot.index] = slot
    assignment.on_assign(keys(0, 1))
    assert host.spawned == []  # no new process: the ones started ahead take the tasks
    assert [s.tasks for s in ahead[:2]] == [["0_0"], ["0_1"]]
    assert sent(ahead[0], "assign") == [{"partitions": [("proj-in", 0, 0)]}]
    assert sent(ahead[1], "assign") == [{"partitions": [("proj-in", 1, 0)]}]
    assert ahead[2].tasks == [] and ahead[2].retiring  # given nothing: stopped
    assert ahead[0].alive and not ahead[0].retiring and not ahead[1].retiring


def test_failed_and_retiring_slots_take_no_new_tasks() -> None:
    assignment, host = make(max_children=2)
    failed = host.slots[0] = ChildSlot(0, ["0_0"])
    failed.fail(0.0, 300.0)
    retiring = host.slots[1] = live_slot(1, ["0_1"])
    retiring.retire(0.0)
    assignment.on_assign(keys(2))
    assert failed.tasks == ["0_0"] and retiring.tasks == ["0_1"] and sent(retiring, "assign") == []
    assert host.spawned == [2] and host.slots[2].tasks == ["0_2"]


def test_a_revoke_waits_for_the_children_commits_and_retires_an_empty_child() -> None:
    assignment, host = make()
    host.revoke_answers = {0: [{"op": "revoked", "offsets": [["proj-in", 0, 40], ["proj-in", 2, 7]]}],
                           1: [{"op": "revoked", "offsets": [["proj-in", 1, 3]]}]}
    assignment.on_assign(keys(0, 1, 2, 3))
    assert host.slots[0].tasks == ["0_0", "0_2"] and host.slots[1].tasks == ["0_1", "0_3"]
    assignment.on_revoke(keys(0, 1, 2))
    slot0, slot1 = host.slots[0], host.slots[1]
    assert sent(slot0, "revoke") == [{"partitions": [["proj-in", 0], ["proj-in", 2]]}]
    assert sent(slot1, "revoke") == [{"partitions": [["proj-in", 1]]}]
    # the revoked offsets were committed, synchronously, before the partitions went
    assert host.member.commits == [  # type: ignore[union-attr]
        {("proj-in", 0): 40, ("proj-in", 1): 3, ("proj-in", 2): 7, ("proj-in", 3): 0}]
    assert slot1.tasks == ["0_3"] and slot1.state == "starting" and not slot1.retiring
    assert slot0.tasks == [] and slot0.retiring and slot0.state == "stopping"
    assert slot0.signals == [signal.SIGTERM]  # type: ignore[attr-defined]
    assert assignment.offsets == {("proj-in", 3): 0} and host.exits == {}
    # the timers' owner is chosen again before the callback returns (task 0_0 left us)
    assert host.timer_checks == 1


def test_a_child_that_does_not_give_back_a_revoked_task_is_killed_as_a_crash() -> None:
    assignment, host = make(shutdown_timeout=0.05)
    assignment.on_assign(keys(0, 1))
    slot = host.slots[0]
    slot.state = "running"
    assignment.on_revoke(keys(0))
    assert signal.SIGKILL in slot.signals and host.exits == {0: False}  # type: ignore[attr-defined]
    assert 0 not in host.slots  # no task left: dropped (not alive, nothing to wait for)
    # a revoke commits (synchronously) whatever is pending, here the start offsets
    assert host.member.commits == [{("proj-in", 0): 0, ("proj-in", 1): 0}]  # type: ignore[union-attr]
    assert assignment.offsets == {("proj-in", 1): 0}


def test_lost_tasks_are_taken_back_without_a_commit_and_the_kill_is_planned(monkeypatch) -> None:
    monkeypatch.setattr("supervisor.rebalance.LOST_GRACE", 0.05)
    assignment, host = make(shutdown_timeout=30.0, max_children=1)
    assignment.on_assign(keys(0, 1))
    slot = host.slots[0]
    slot.state = "running"
    assignment.record_offsets(slot, [["proj-in", 0, 11]])
    channel = slot.channel
    started = time.monotonic()
    assignment.on_lost(keys(0))  # waits LOST_GRACE at most, not the shutdown timeout
    assert time.monotonic() - started < 5
    assert channel.sent[-1] == ("revoke", {"partitions": [["proj-in", 0]]})  # type: ignore[union-attr]
    assert host.exits == {0: True}  # planned: it restarts at once, no crash counted
    assert host.member.commits == [] and host.member.soon == []  # type: ignore[union-attr]
    assert slot.tasks == ["0_1"] and assignment.offsets == {("proj-in", 1): 0}


def test_while_stopping_a_revoke_commits_what_was_reported_and_lets_go() -> None:
    assignment, host = make()
    assignment.on_assign(keys(0, 1))
    assignment.record_offsets(host.slots[0], [["proj-in", 0, 8]])
    host.stopping = "warm"
    assignment.on_revoke(keys(0, 1))
    assert host.member.commits == [{("proj-in", 0): 8, ("proj-in", 1): 0}]  # type: ignore[union-attr]
    assert assignment.offsets == {} and all(sent(s, "revoke") == [] for s in host.slots.values())
    assignment.on_assign(keys(2))  # shutting down: the member's close gives it back
    assert assignment.unplaced == [] and sorted(host.slots) == [0, 1]


def test_nothing_is_taken_back_while_the_member_closes() -> None:
    assignment, host = make()
    assignment.on_assign(keys(0))
    host.closing = True
    assignment.on_revoke(keys(0))
    assert assignment.offsets == {("proj-in", 0): 0} and sent(host.slots[0], "revoke") == []
    assert host.member.commits == []  # type: ignore[union-attr]


def test_offsets_are_recorded_forward_only_and_for_the_childs_own_tasks() -> None:
    assignment, host = make()
    assignment.on_assign(keys(0, 1))
    slot0 = host.slots[0]
    assignment.record_offsets(slot0, [["proj-in", 0, 10]])
    assignment.record_offsets(slot0, [["proj-in", 0, 9]])    # backwards: ignored
    assignment.record_offsets(slot0, [["proj-in", 1, 50]])   # not its task: ignored
    assignment.record_offsets(slot0, [["proj-in", 3, 50]])   # not ours at all: ignored
    assert assignment.offsets == {("proj-in", 0): 10, ("proj-in", 1): 0}


def test_the_periodic_commit_is_throttled_asynchronous_and_resent() -> None:
    assignment, host = make()
    member = host.member
    assignment.on_assign(keys(0, 1))
    assignment.record_offsets(host.slots[0], [["proj-in", 0, 10]])
    assignment.commit(force=False)
    assert member.soon == [{("proj-in", 0): 10, ("proj-in", 1): 0}] and member.commits == []  # type: ignore[union-attr]
    assignment.commit(force=False)  # within commit_interval: nothing
    assignment._last_commit = 0.0
    assignment.commit(force=False)  # the same, unconfirmed, within COMMIT_RESEND: not again
    assert len(member.soon) == 1  # type: ignore[union-attr]
    member.acknowledged = {("proj-in", 0): 10, ("proj-in", 1): 0}  # type: ignore[union-attr]
    assignment._last_commit = 0.0
    assignment.commit(force=False)  # confirmed: nothing pending
    assert assignment.committed == {("proj-in", 0): 10, ("proj-in", 1): 0} and len(member.soon) == 1  # type: ignore[union-attr]
    assignment.record_offsets(host.slots[0], [["proj-in", 0, 12]])
    assignment.commit(force=True)
    assert member.commits == [{("proj-in", 0): 12}]  # type: ignore[union-attr]


def test_exactly_once_never_commits_as_the_member_and_shares_the_group_metadata() -> None:
    assignment, host = make("exactly_once")
    member = host.member
    assignment.on_assign(keys(0, 1))
    for slot in host.slots.values():  # every new process hears the metadata before its tasks
        assert slot.channel.ops() == ["group", "assign"]  # type: ignore[union-attr]
    assignment.share_group_metadata()  # first turn: sent to every live child
    assignment.share_group_metadata()  # unchanged: not sent again
    member.metadata = b"generation-2"  # type: ignore[union-attr]
    host.slots[1].fail(0.0, 300.0)     # no process: not told
    assignment.share_group_metadata()
    assert host.slots[0].channel.ops().count("group") == 3  # type: ignore[union-attr]
    assert host.slots[1].channel.ops().count("group") == 2  # type: ignore[union-attr]
    assignment.record_offsets(host.slots[0], [["proj-in", 0, 5]])
    assignment.commit(force=True)
    assignment.commit_final()
    assert member.commits == [] and member.soon == []  # type: ignore[union-attr]
    assert assignment.committed == {("proj-in", 0): 5, ("proj-in", 1): 0}
