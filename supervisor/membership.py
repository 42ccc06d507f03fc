"""The supervisor's seat in the consumer group.

A ``confluent_kafka.Consumer`` subscribed to the app's source topics with the
cooperative-sticky assignor.  It never processes a record: it pauses every partition it is
given and polls only so that heartbeats, rebalance callbacks and offset commits happen.
The children read with ``assign()`` and are not members, so (as on real Kafka) only this
consumer may commit the group's offsets.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

from shardworker.app import App
from shardworker.topology import TopicPartitionKey

log = logging.getLogger("supervisor.membership")

Callback = Callable[[List[TopicPartitionKey]], None]


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
        })

    def subscribe(self, topics: Sequence[str]) -> None:
        self.consumer.subscribe(list(topics), on_assign=self._assigned,
                                on_revoke=self._revoked, on_lost=self._lost)

    # librdkafka calls these from inside poll(), in the supervisor's main thread
    def _assigned(self, consumer: Consumer, partitions: List[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        consumer.pause(partitions)
        self.rebalances += 1
        keys = [(p.topic, p.partition) for p in partitions]
        self.assigned.extend(keys)
        self._on_assign(keys)  # also when empty: it tells that the group was joined

    def _revoked(self, consumer: Consumer, partitions: List[TopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        if keys:
            self._on_revoke(keys)  # returns only when the tasks are stopped and committed
        self._forget(keys)
        consumer.incremental_unassign(partitions)

    def _lost(self, consumer: Consumer, partitions: List[TopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        if keys:
            self._on_lost(keys)
        self._forget(keys)
        consumer.incremental_unassign(partitions)

    def _forget(self, keys: List[TopicPartitionKey]) -> None:
        gone = set(keys)
        self.assigned = [k for k in self.assigned if k not in gone]

    def poll(self) -> None:
        """Serves heartbeats and rebalance callbacks; records never arrive (all paused)."""
        msg = self.consumer.poll(0)
        if msg is not None and msg.error() is not None:
            log.warning("group member: %s", msg.error().str())

    def start_offsets(self, keys: List[TopicPartitionKey], timeout: float = 30.0
                      ) -> Dict[TopicPartitionKey, int]:
        """Committed offsets of the group, or where ``auto_offset_reset`` says for none.
        Offsets in a transaction still open (a child killed mid-commit) are not answered
        until it ends; the timeout outlasts the transactions' own (10 s)."""
        reset = OFFSET_END if self.app.settings["auto_offset_reset"] == "latest" else OFFSET_BEGINNING
        committed = self.consumer.committed([TopicPartition(t, p) for t, p in keys], timeout=timeout)
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else reset) for tp in committed}

    def group_metadata(self) -> bytes:
        """librdkafka's serialized group metadata (group, generation, member id): what a
        child's transaction needs to commit offsets on this member's behalf (KIP-447)."""
        return bytes(self.consumer.consumer_group_metadata())

    def commit(self, offsets: Dict[TopicPartitionKey, int]) -> bool:
        """Commits as the group member; False (logged) when the broker refuses."""
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                 asynchronous=False)
            return True
        except KafkaException as exc:
            log.warning("offset commit failed: %s", exc.args[0].str())
            return False

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
