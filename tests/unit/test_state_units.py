"""Unit tests of the worker's side of an interruptible restore: how a child tells, in the
middle of a restore, that the supervisor revoked the task or stops it (real socketpair,
real Channel; the decision is pure logic)."""
from __future__ import annotations

import socket
from collections import deque

import pytest

from shardworker.protocol import Assign, Channel, Revoke, Stop
from shardworker.worker import Worker


def worker_with_channel() -> "tuple[Worker, Channel]":
    ours, theirs = socket.socketpair()
    worker = Worker.__new__(Worker)  # only the attributes _told_to_let_go reads
    worker.channel = Channel(ours)
    worker.stopping = False
    worker.control = deque()
    return worker, Channel(theirs)


@pytest.mark.timeout(10)
def test_a_restore_is_told_to_stop_by_a_revoke_of_its_partition_only_and_by_stop():
    worker, supervisor = worker_with_channel()
    assert not worker._told_to_let_go([("in", 1)])
    supervisor.send(Revoke([["in", 2], ["in", 3]]))
    assert not worker._told_to_let_go([("in", 1)])
    assert worker._told_to_let_go([("in", 3)])
    # the messages stay queued, in order, for handle_control
    assert [m.op for m in worker.control] == ["revoke"]
    worker.control.clear()  # handle_control acted on them
    assert not worker._told_to_let_go([("in", 3)])
    supervisor.send(Stop())
    assert worker._told_to_let_go([("in", 1)])
    assert [m.op for m in worker.control] == ["stop"]
    worker.control.clear()
    worker.stopping = True  # TERM
    assert worker._told_to_let_go([("in", 1)])


@pytest.mark.timeout(10)
def test_a_restore_stops_when_the_supervisor_has_gone():
    worker, supervisor = worker_with_channel()
    supervisor.close()
    assert worker._told_to_let_go([("in", 0)])


@pytest.mark.timeout(10)
def test_a_stop_read_together_with_the_assign_still_interrupts_its_restore():
    """The supervisor's assign and stop arrive in one read (the child was busy): the
    stop waits in the queue while the assign restores, and the restore sees it."""
    worker, supervisor = worker_with_channel()
    supervisor.send(Assign([["in", 1, 0]]))
    supervisor.send(Stop())
    worker.control.extend(worker.channel.receive())  # what handle_control does
    assert worker.control.popleft().op == "assign"  # ... and acts on: the restore runs
    assert worker._told_to_let_go([("in", 1)])
