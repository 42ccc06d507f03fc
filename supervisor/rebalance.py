"""This supervisor's share of the group: the partitions assigned to it, their offsets,
and what a rebalance does with them.

Owns:

* ``offsets``: per placed partition, the next offset to read as the children reported
  it (acknowledged work); ``committed``: what the group has committed of it;
* ``unplaced``: assigned partitions whose start offsets the broker has not answered yet;
* the three moves of a rebalance (DESIGN.md, "Processes"): *assign* places the new
  tasks on children (:func:`~supervisor.placement.place_tasks`), *revoke* takes them
  back warm and commits before the callback returns, *lost* takes them back and commits
  nothing (the group gave them away already);
* the commit of the children's offsets as the group member, and, exactly-once, the
  group metadata the children's transactions need (their transactions commit instead).

The arbiter's slots, its group member and its waiting loop are reached through
:class:`Host`, which the arbiter is; this module never imports the arbiter.  The
rebalance callbacks run inside librdkafka's ``poll``, in the arbiter's main thread.
"""
from __future__ import annotations

import base64
import logging
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Protocol

from confluent_kafka import KafkaException

from shardworker.app import App
from shardworker.protocol import Assign, Group
from shardworker.topology import TopicPartitionKey

from .children import ChildSlot
from .placement import place_tasks

if TYPE_CHECKING:  # pragma: no cover
    from .membership import GroupMember


class Host(Protocol):
    """What the assignment needs of the arbiter (tests give it a stand-in)."""

    slots: Dict[int, ChildSlot]
    member: Optional[GroupMember]
    stopping: Optional[str]   # None, "warm" or "cold"
    closing: bool             # the member is being closed: nothing to take back
    max_children: int
    shutdown_timeout: float

    def spawn(self, slot: ChildSlot) -> None: ...
    def sleep(self, timeout: float) -> None: ...
    def read_children(self) -> None: ...
    def reap(self) -> None: ...
    def assign_timers(self) -> None: ...


log = logging.getLogger("supervisor")  # the arbiter's: these lines are part of its story

PLACE_RETRY = 2.0     # seconds between tries to learn the start offsets of new partitions
COMMIT_RESEND = 10.0  # seconds before unconfirmed asynchronous commits are sent again
LOST_GRACE = 5.0      # seconds a child may take to give back partitions the group lost
FINAL_COMMIT_WAIT = 10.0  # seconds a shutdown waits for the broker to confirm its commit


class Assignment:
    """The partitions the group gave this supervisor, placed on the host's children."""

    def __init__(self, app: App, host: Host) -> None:
        self.app = app
        self.host = host
        self.topology = app.topology
        self.joined = False
        #: per partition: next offset to read, as reported by the children (acknowledged work)
        self.offsets: Dict[TopicPartitionKey, int] = {}
        self.committed: Dict[TopicPartitionKey, int] = {}
        #: assigned partitions whose start offsets the broker has not answered yet
        self.unplaced: List[TopicPartitionKey] = []
        self.next_placement = 0.0
        self._last_commit = 0.0
        self._commit_sent: Dict[TopicPartitionKey, int] = {}  # asynchronous, unconfirmed
        self._commit_sent_at = 0.0
        #: exactly-once: the group metadata the children have (their transactions need it)
        self._shared_metadata: Optional[bytes] = None

    # -- the group's callbacks ----------------------------------------------------------
    def on_assign(self, partitions: List[TopicPartitionKey]) -> None:
        """The group gave us leader partitions: their whole tasks are ours (every source
        partition of each; DESIGN.md, "Sub-topologies")."""
        self.joined = True
        partitions = self.topology.whole_tasks(partitions)
        if self.host.stopping:
            return  # shutting down: member.close() gives them back
        if partitions:
            self.unplaced.extend(p for p in partitions if p not in self.unplaced)
            self.next_placement = 0.0
            self.place_unplaced()
        self.release_unused()

    def on_revoke(self, partitions: List[TopicPartitionKey]) -> None:
        """Stops the revoked tasks (warm) and commits them before the group moves them."""
        partitions = self.topology.whole_tasks(partitions)
        self.take_back(partitions, commit=True)

    def on_lost(self, partitions: List[TopicPartitionKey]) -> None:
        """The group gave these away already (we were too slow): stop them, commit nothing."""
        log.warning("lost partitions %s", partitions)
        partitions = self.topology.whole_tasks(partitions)
        self.take_back(partitions, commit=False)

    # -- placing tasks ------------------------------------------------------------------
    def place_unplaced(self) -> None:
        """Starts the tasks of newly assigned partitions once the group's start offsets
        are known.  The broker may not answer (an outage, a transaction still open): that
        is logged and tried again on a later loop turn, never raised, because this runs
        inside librdkafka's rebalance callback and an exception there would end the
        supervisor (issue 11, point 7)."""
        member = self.host.member
        if not self.unplaced or self.host.stopping or member is None:
            return
        if time.monotonic() < self.next_placement:
            return
        try:
            offsets = member.start_offsets(self.unplaced)
        except KafkaException as exc:
            self.next_placement = time.monotonic() + PLACE_RETRY
            log.warning("start offsets of tasks %s not available (%s); trying again in %.0fs",
                        ",".join(self.topology.group_by_task(self.unplaced)), exc, PLACE_RETRY)
            return
        partitions, self.unplaced = self.unplaced, []
        self.offsets.update(offsets)
        self.place(partitions)
        self.release_unused()  # children started ahead that got none of them

    def place(self, partitions: List[TopicPartitionKey]) -> None:
        """Hands the tasks of ``partitions`` (start offsets known) to children."""
        slots = self.host.slots
        tasks = list(self.topology.group_by_task(partitions))
        log.info("assigned tasks %s", ",".join(tasks))
        # a failed slot takes no new work: its tasks wait for their retry (or a HUP)
        # (nor does one that is retiring: it is on its way out with whatever it holds)
        hosted = {i: s.tasks for i, s in slots.items() if s.state != "failed" and not s.retiring}
        for_existing, for_new = place_tasks(tasks, hosted, self.host.max_children)
        for index, new in for_existing.items():
            slot = slots[index]
            ahead = not slot.tasks  # started before the group assigned anything
            slot.add_tasks(new)
            if slot.alive:
                if ahead:
                    self.assign_new_child(slot)
                else:
                    self.send_assign(slot, new)
        for new in for_new:
            index = next(i for i in range(len(slots) + 1) if i not in slots)
            slot = slots[index] = ChildSlot(index, new)
            self.host.spawn(slot)

    def release_unused(self) -> None:
        """Stops each child started ahead of the group's first assignment (the arbiter's
        ``start_ahead``) that the group gave no task: every child hosts a task (nothing
        waits to be placed)."""
        if self.unplaced:
            return
        now = time.monotonic()
        for slot in list(self.host.slots.values()):
            if not slot.tasks and not slot.retiring and slot.state != "failed":
                log.info("child %d has no task: stopping it", slot.index)
                if not slot.retire(now):
                    del self.host.slots[slot.index]

    def assign_new_child(self, slot: ChildSlot) -> None:
        """Tells a newly started process what it works on: the group metadata
        (exactly-once) and its tasks with their start offsets."""
        if self.app.exactly_once:
            self.send_group_metadata([slot])
        self.send_assign(slot, slot.tasks)

    def send_assign(self, slot: ChildSlot, tasks: List[str]) -> None:
        parts = [(t, p, self.offsets[(t, p)]) for task in tasks
                 for t, p in self.topology.task_partitions(task)]
        slot.send(Assign(parts))

    # -- taking tasks back --------------------------------------------------------------
    def take_back(self, partitions: List[TopicPartitionKey], commit: bool) -> None:
        """Stops the tasks of ``partitions`` on their children and forgets them; with
        ``commit`` (a revoke), their offsets are committed first.  Waits (serving the
        children) until each child gave them back or was killed."""
        host = self.host
        gone = set(partitions)
        self.unplaced = [p for p in self.unplaced if p not in gone]
        partitions = [p for p in partitions if p in self.offsets]  # only those placed
        if host.closing:
            return
        if not partitions:
            self.release_unused()  # a child started ahead for tasks taken back unplaced
            return
        if host.stopping:  # children are stopping anyway: keep what they reported, let go
            if commit:
                self.commit(force=True)
            self.forget(partitions)
            return
        revoked = self.topology.group_by_task(partitions)
        log.info("revoking tasks %s", ",".join(revoked))
        waiting = []
        for slot in host.slots.values():
            mine = [t for t in slot.tasks if t in revoked]
            if mine and slot.alive:
                slot.revoke([list(tp) for t in mine for tp in revoked[t]])
                waiting.append(slot)
        # lost partitions belong to someone else already, and a child that cannot give
        # them back is most likely waiting on the unreachable broker that lost them
        grace = host.shutdown_timeout if commit else min(host.shutdown_timeout, LOST_GRACE)
        deadline = time.monotonic() + grace
        while any(s.revoking and s.alive for s in waiting) and time.monotonic() < deadline:
            host.sleep(0.05)
            host.read_children()
            host.reap()
        for slot in waiting:
            if slot.revoking and slot.alive:
                # it must not go on with a task the group gives to someone else
                if commit:
                    log.error("child %d did not give back tasks within %.0fs; killing it",
                              slot.index, grace)
                else:  # not its fault: a planned stop, not a crash
                    log.warning("child %d did not give back lost tasks within %.0fs; killing "
                                "it (its uncommitted work is read again)", slot.index, grace)
                slot.kill(planned=not commit)
                while slot.alive:
                    host.sleep(0.05)
                    host.reap()
        if commit:
            self.commit(force=True)
        now = time.monotonic()
        for slot in list(host.slots.values()):
            slot.drop_tasks(revoked)
            if not slot.tasks and not slot.retire(now):
                del host.slots[slot.index]
        self.forget(partitions)
        # before the group can give task 0_0 to another supervisor, whose child would
        # start the timers: ours is told to stop first (DESIGN.md, "Timers, crontab and tasks")
        host.assign_timers()

    def forget(self, partitions: List[TopicPartitionKey]) -> None:
        for key in partitions:
            self.offsets.pop(key, None)
            self.committed.pop(key, None)

    # -- offsets ------------------------------------------------------------------------
    def record_offsets(self, slot: ChildSlot, offsets: List[List[object]]) -> None:
        """A child's report of what it processed: kept for the partitions of its own
        tasks, and only forward."""
        owned = set(slot.tasks)
        for topic, part, offset in offsets:
            key = (str(topic), int(part))  # type: ignore[call-overload]
            tasks = self.topology.group_by_task([key])
            if key in self.offsets and owned.intersection(tasks) and int(offset) >= self.offsets[key]:  # type: ignore[call-overload]
                self.offsets[key] = int(offset)  # type: ignore[call-overload]

    def pending(self) -> Dict[TopicPartitionKey, int]:
        """Reported offsets the group has not committed."""
        return {k: o for k, o in self.offsets.items() if o >= 0 and self.committed.get(k) != o}

    def commit(self, force: bool) -> None:
        """Commits the children's processed offsets as the group member (throttled).
        Exactly-once: the children's transactions committed them before reporting them;
        a commit from here could land after a newer transactional one and undo it.

        The periodic commit does not wait for the broker (an outage must not stop this
        loop: issue 11, point 7); what it confirms is taken on later turns, and what it
        does not confirm is sent again after COMMIT_RESEND.  ``force`` (a revoke, the
        shutdown) waits for the broker's answer."""
        member = self.host.member
        now = time.monotonic()
        if member is not None:
            confirmed = member.take_acknowledged()
            self.committed.update({k: o for k, o in confirmed.items() if k in self.offsets})
        if not force and now - self._last_commit < self.app.settings["commit_interval"]:
            return
        self._last_commit = now
        pending = self.pending()
        if not pending or member is None:
            return
        if self.app.exactly_once:
            self.committed.update(pending)
        elif force:
            if member.commit(pending):
                self.committed.update(pending)
        elif pending != self._commit_sent or now - self._commit_sent_at >= COMMIT_RESEND:
            member.commit_soon(pending)
            self._commit_sent, self._commit_sent_at = pending, now

    def commit_final(self) -> None:
        """The shutdown's commit: waits for the broker's confirmation, but at most
        FINAL_COMMIT_WAIT seconds, so a shutdown during an outage still ends (what is
        not confirmed is read again by the next owner: at least once)."""
        member = self.host.member
        if member is None or self.app.exactly_once:
            self.commit(force=True)
            return
        self.committed.update(member.take_acknowledged())
        pending = self.pending()
        if not pending:
            return
        if member.commit_within(pending, FINAL_COMMIT_WAIT):
            self.committed.update(pending)
        else:
            log.warning("the broker did not confirm the final commit within %.0fs; records "
                        "after the group's last committed offsets will be read again",
                        FINAL_COMMIT_WAIT)

    # -- exactly-once: the group metadata -----------------------------------------------
    def share_group_metadata(self) -> None:
        """Exactly-once: sends every child the member's group metadata when it changes
        (each rebalance starts a generation; a stale one gets their commits refused)."""
        member = self.host.member
        if not self.app.exactly_once or member is None or not self.joined:
            return
        metadata = member.group_metadata()
        if metadata != self._shared_metadata:
            self._shared_metadata = metadata
            self.send_group_metadata([slot for slot in self.host.slots.values() if slot.alive])

    def send_group_metadata(self, slots: List[ChildSlot]) -> None:
        member = self.host.member
        assert member is not None
        encoded = base64.b64encode(member.group_metadata()).decode()
        for slot in slots:
            slot.send(Group(encoded))
