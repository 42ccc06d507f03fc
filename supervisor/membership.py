"""The supervisor's seat in the consumer group.

A ``confluent_kafka.Consumer`` subscribed to the app's source topics with the
cooperative-sticky assignor.  It never processes a record: it pauses every partition it is
given and polls only so that heartbeats, rebalance callbacks and offset commits happen.
The children read with ``assign()`` and are not members, so (as on real Kafka) only this
consumer may commit the group's offsets.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

from confluent_kafka import (OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException,
                             TopicPartition)

from shardworker.app import App
from shardworker.metrics import Histogram
from shardworker.topology import TopicPartitionKey

log = logging.getLogger("supervisor.membership")

Callback = Callable[[List[TopicPartitionKey]], None]
#: buckets of the commit latency (seconds): a local broker answers in milliseconds
COMMIT_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)


class GroupMember:
    """Joins the group named by the app id and reports partition changes to the arbiter."""

    def __init__(self, app: App, bootstrap: str, on_assign: Callback, on_revoke: Callback,
                 on_lost: Callback) -> None:
        self.app = app
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self.assigned: List[TopicPartitionKey] = []
        self.rebalances = 0
        self._last_warning = ("", 0.0)  # (text, monotonic time) of the last poll error logged
        #: offsets the broker confirmed for asynchronous commits, not yet taken
        self._acknowledged: Dict[TopicPartitionKey, int] = {}
        #: seconds from an offset commit sent to the broker's answer (at least once: the
        #: children's offsets; exactly-once commits are the children's transactions)
        self.commit_latency = Histogram(
            "shardsup_commit_latency_seconds", "Seconds from an offset commit sent by the "
            "supervisor to the broker's confirmation.", buckets=COMMIT_BUCKETS)
        self._commits_sent: Deque[float] = deque()  # monotonic times, oldest first
        self._in_sync_commit = False
        self.consumer = Consumer({
            **app.kafka_config(bootstrap),
            "group.id": app.id,
            "client.id": f"{app.id}-supervisor",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": int(app.settings["session_timeout_ms"]),
            "heartbeat.interval.ms": max(100, int(app.settings["session_timeout_ms"]) // 10),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": app.settings["auto_offset_reset"],
            # committed() then waits for offsets of transactions still being committed
            "isolation.level": "read_committed",
            "on_commit": self._on_commit,
        })

    def subscribe(self, topics: Sequence[str]) -> None:
        self.consumer.subscribe(list(topics), on_assign=self._assigned,
                                on_revoke=self._revoked, on_lost=self._lost)

    # librdkafka calls these from inside poll(), in the supervisor's main thread.  An
    # exception raised in one would come out of poll() and end the supervisor, so a
    # Kafka error in them (a broker gone in the middle of a rebalance) is logged; the
    # arbiter retries what needs the broker on its next loop turn (issue 11, point 7).
    def _assigned(self, consumer: Consumer, partitions: List[TopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        try:
            consumer.incremental_assign(partitions)
            consumer.pause(partitions)
        except KafkaException as exc:
            log.warning("group member: taking %s: %s", keys, exc)
        self.rebalances += 1
        self.assigned.extend(keys)
        self._call("assign", self._on_assign, keys)  # also when empty: the group was joined

    def _revoked(self, consumer: Consumer, partitions: List[TopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        if keys:
            self._call("revoke", self._on_revoke, keys)  # returns once stopped and committed
        self._forget(keys)
        self._unassign(consumer, partitions)

    def _lost(self, consumer: Consumer, partitions: List[TopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        if keys:
            self._call("lost", self._on_lost, keys)
        self._forget(keys)
        self._unassign(consumer, partitions)

    @staticmethod
    def _call(what: str, callback: Callback, keys: List[TopicPartitionKey]) -> None:
        try:
            callback(keys)
        except KafkaException as exc:
            log.error("group member: handling the %s of %s: %s", what, keys, exc)

    @staticmethod
    def _unassign(consumer: Consumer, partitions: List[TopicPartition]) -> None:
        try:
            consumer.incremental_unassign(partitions)
        except KafkaException as exc:
            log.warning("group member: giving back %s: %s", partitions, exc)

    def _forget(self, keys: List[TopicPartitionKey]) -> None:
        gone = set(keys)
        self.assigned = [k for k in self.assigned if k not in gone]

    def poll(self) -> None:
        """Serves heartbeats and rebalance callbacks; records never arrive (all paused)."""
        msg = self.consumer.poll(0)
        if msg is not None and msg.error() is not None:
            self._warn(msg.error().str())

    def _warn(self, text: str, every: float = 30.0) -> None:
        """Logs a poll error, the same one at most every ``every`` seconds (an outage
        would otherwise repeat it on every loop turn)."""
        now = time.monotonic()
        last_text, last_time = self._last_warning
        if text != last_text or now - last_time >= every:
            log.warning("group member: %s", text)
            self._last_warning = (text, now)

    def start_offsets(self, keys: List[TopicPartitionKey], timeout: float = 20.0
                      ) -> Dict[TopicPartitionKey, int]:
        """Committed offsets of the group, or where ``auto_offset_reset`` says for none.
        Offsets in a transaction still open (a child killed mid-commit) are not answered
        until it ends; the timeout outlasts the transactions' own (10 s) and stays under
        systemd's WatchdogSec (30 s).  Raises KafkaException when the broker does not
        answer in time (the caller tries again later)."""
        reset = OFFSET_END if self.app.settings["auto_offset_reset"] == "latest" else OFFSET_BEGINNING
        committed = self.consumer.committed([TopicPartition(t, p) for t, p in keys], timeout=timeout)
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else reset) for tp in committed}

    def group_metadata(self) -> bytes:
        """librdkafka's serialized group metadata (group, generation, member id): what a
        child's transaction needs to commit offsets on this member's behalf (KIP-447)."""
        return bytes(self.consumer.consumer_group_metadata())

    def commit_soon(self, offsets: Dict[TopicPartitionKey, int]) -> None:
        """Commits as the group member without waiting: the supervisor's loop must not
        stop while the broker is away (its children, status socket and systemd's
        watchdog need it).  What the broker confirms comes back from :meth:`poll`
        through :meth:`take_acknowledged`."""
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                 asynchronous=True)
            self._commits_sent.append(time.monotonic())
        except KafkaException as exc:
            self._warn(f"offset commit failed: {exc.args[0].str()}")

    def commit_within(self, offsets: Dict[TopicPartitionKey, int], timeout: float) -> bool:
        """Commits and waits at most ``timeout`` seconds for the broker to confirm every
        offset; False when it did not (the broker is away).  It polls, so it is for the
        shutdown only, never inside a rebalance callback."""
        self.commit_soon(offsets)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.05)
            if msg is not None and msg.error() is not None:
                self._warn(msg.error().str())
            if all(self._acknowledged.get(key) == offset for key, offset in offsets.items()):
                return True
        return False

    def _on_commit(self, error: Optional[KafkaError], partitions: List[TopicPartition]) -> None:
        # librdkafka answers commits in the order they were sent; a synchronous commit
        # calls this too, but measures itself (commit())
        sent = (self._commits_sent.popleft() if self._commits_sent and not self._in_sync_commit
                else None)
        if error is not None:
            self._warn(f"offset commit failed: {error.str()}")
            return
        for tp in partitions:
            if tp.error is None and tp.offset >= 0:
                self._acknowledged[(tp.topic, tp.partition)] = tp.offset
        if sent is not None:
            self.commit_latency.observe(time.monotonic() - sent)

    def take_acknowledged(self) -> Dict[TopicPartitionKey, int]:
        """Offsets the broker confirmed since the last call."""
        acknowledged, self._acknowledged = self._acknowledged, {}
        return acknowledged

    def commit(self, offsets: Dict[TopicPartitionKey, int]) -> bool:
        """Commits as the group member and waits (a revoke must have its offsets
        committed before the partitions move); False (logged) when the broker refuses."""
        began = time.monotonic()
        self._in_sync_commit = True
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                 asynchronous=False)
            self.commit_latency.observe(time.monotonic() - began)
            return True
        except KafkaException as exc:
            log.warning("offset commit failed: %s", exc.args[0].str())
            return False
        finally:
            self._in_sync_commit = False

    def group_state(self) -> Dict[str, Any]:
        """What the member knows of its group membership (for status and logs)."""
        generation: Optional[int] = None
        member_id: Optional[str] = None
        try:
            member_id = self.consumer.memberid() or None
            metadata = self.consumer.consumer_group_metadata()
            # librdkafka's serialized form: b"CGMDv2:" + int32 generation id + ...
            if isinstance(metadata, bytes) and metadata.startswith(b"CGMDv2:"):
                generation = int.from_bytes(metadata[7:11], "big", signed=True)
        except (KafkaException, RuntimeError):
            pass
        joined = generation is not None and generation >= 0
        return {"state": "stable" if joined else "joining",
                "generation": generation if joined else None, "member_id": member_id,
                "rebalances": self.rebalances}

    def close(self) -> None:
        """Leaves the group at once (no session-timeout wait for the others)."""
        self.consumer.close()


__all__ = ["GroupMember", "OFFSET_BEGINNING", "OFFSET_END"]
