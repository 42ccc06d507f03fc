"""The supervisor's mirror of its app's global tables (DESIGN.md, "Global tables").

One thread with one consumer reads every partition of each global table's topic with
``assign()`` (no group membership, nothing committed) and writes the last value per key
into the table's one LMDB environment under the datadir, which the children read
(:mod:`shardworker.globaltables`).  Each write transaction holds the records and the next
offset per partition they bring the copy to, so a restart goes on from there.

Catch-up: :meth:`GlobalMirror.start` (before any child is spawned) clears each copy's
caught-up mark; the thread sets it, in the transaction of the records that complete it,
once every partition reached the end it had when the mirror started: the high watermark
of the first fetch response (ListOffsets is wrong on tansu, DESIGN.md, "Tests and the
broker"), or an end-of-partition event.  Children process nothing before that
(:class:`~shardworker.globaltables.CatchUpGate`).  Then the thread follows the topics
live.  A broker outage is logged and waited out (librdkafka retries); nothing here ends
the supervisor.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from shardworker.app import App
from shardworker.beginning import assignable
from shardworker.globaltables import META_CAUGHT_UP, GlobalTable, global_dir
from shardworker.store import TaskStore

log = logging.getLogger("supervisor.globalmirror")

#: records taken from the consumer per batch (one LMDB write transaction per copy)
BATCH = 2000
#: seconds between looks for partitions added to a mirrored topic
METADATA_EVERY = 30.0
#: the same warning (a broker error) is logged at most this often (seconds)
WARN_EVERY = 30.0

#: (partition, offset, key, value) of one record of a copy's topic
Record = Tuple[int, int, Optional[bytes], Optional[bytes]]


class TopicRewound(RuntimeError):
    """A partition gave a record, or ended, below the copy's stored position: the topic
    was deleted and created again (a fresh embedded broker, say), or truncated; the
    consumer fell back to its earliest offset."""

    def __init__(self, topic: str, text: str) -> None:
        super().__init__(text)
        self.topic = topic


class TableCopy:
    """One global table's copy as the mirror writes it, over its LMDB store: applies
    batches (last value per key wins, a None value deletes), stores the positions in the
    same transaction, and decides when the copy has caught up.  No Kafka here."""

    def __init__(self, table: GlobalTable, store: TaskStore) -> None:
        self.table = table
        self.name = table.name
        self.topic: str = table.topic.name
        self.store = store
        #: next offset to read per partition: what the store holds
        self.positions: Dict[int, int] = self._stored_positions()
        #: while catching up: the partitions not there yet → the end each must reach
        #: (None: not known until a fetch answered); None: the partitions are not known
        self.waiting: Optional[Dict[int, Optional[int]]] = None
        #: every partition of the topic known so far
        self.partitions: List[int] = []
        self.caught_up = False
        self.applied = 0
        self.keyless = 0
        self.began = time.monotonic()

    def _stored_positions(self) -> Dict[int, int]:
        return {part: offset for (topic, part), offset in self.store.input_offsets().items()
                if topic == self.topic}

    def begin_catch_up(self) -> None:
        """Starts a catch-up: clears the caught-up mark, so children started from now on
        wait until the copy reached the topic's current end."""
        self.store.set_meta(META_CAUGHT_UP, None)
        self.caught_up = False
        self.waiting = None
        self.began = time.monotonic()

    def add_partitions(self, partitions: Iterable[int]) -> None:
        """The topic's partitions (all of them at start, new ones later): while catching
        up, each must reach its end too."""
        self.partitions = sorted(set(self.partitions).union(partitions))
        if self.caught_up:
            return
        if self.waiting is None:
            self.waiting = {}
        for part in partitions:
            self.waiting.setdefault(part, None)

    def observe_end(self, partition: int, end: int) -> None:
        """The high watermark a fetch of ``partition`` reported: the first one seen after
        start is what the catch-up must reach (the end then, or later).  One below the
        copy's position is not taken (a topic created again, or a stale answer): the
        end-of-partition event, or a later fetch, decides."""
        if self.waiting is not None and end >= self.positions.get(partition, 0) \
                and partition in self.waiting and self.waiting[partition] is None:
            self.waiting[partition] = end

    def unknown_ends(self) -> List[int]:
        """Partitions still catching up whose end no fetch has told yet."""
        return [p for p, end in (self.waiting or {}).items() if end is None]

    def apply(self, records: Sequence[Record], ends: Mapping[int, int] = {}) -> bool:
        """Writes ``records`` (in offset order per partition) and the positions they bring
        the copy to, in one LMDB transaction; ``ends`` are end-of-partition events
        (partition → the offset reached).  When this completes the catch-up, the mark is
        written in that same transaction.  Returns True when it did."""
        writes: Dict[bytes, Optional[bytes]] = {}
        moved: Dict[int, int] = {}
        for partition, offset, key, value in records:
            expected = moved.get(partition, self.positions.get(partition))
            if expected is not None and offset < expected:
                raise TopicRewound(self.topic, f"{self.topic}[{partition}] gave offset {offset}, "
                                   f"below the copy's position {expected}")
            if key is None:
                self.keyless += 1  # no key: nothing a lookup could find
            else:
                writes[key] = value
            moved[partition] = offset + 1
        for partition, end in ends.items():
            expected = moved.get(partition, self.positions.get(partition, -1))
            if end < expected:  # the end never goes back: the topic is not the one we read
                raise TopicRewound(self.topic, f"{self.topic}[{partition}] ends at {end}, below "
                                   f"the copy's position {expected}")
            moved[partition] = end
        positions = {**self.positions, **moved}
        done = set()
        if self.waiting is not None:
            for partition, end in self.waiting.items():
                if partition in ends or (end is not None and positions.get(partition, 0) >= end):
                    done.add(partition)
        completes = (not self.caught_up and self.waiting is not None and bool(self.waiting)
                     and done == set(self.waiting))
        meta = None
        if completes:
            reached = {str(p): positions.get(p, 0) for p in self.partitions}
            meta = {META_CAUGHT_UP: json.dumps({"ends": reached}, sort_keys=True).encode()}
        if writes or moved or meta:
            self.store.commit({self.name: writes} if writes else {},
                              {(self.topic, p): o for p, o in moved.items()}, {}, meta)
        self.positions = positions
        self.applied += len(records)
        if self.waiting is not None:
            for partition in done:
                del self.waiting[partition]
        if completes:
            self.caught_up = True
            self.waiting = {}
        return completes

    def rewind(self) -> None:
        """Starts the copy over from the topic's beginning (after :class:`TopicRewound`):
        empties it, keeps its identity, and catches up again."""
        identity = self.store.identity()
        self.store.wipe()
        if identity is not None:
            self.store.set_identity(identity["cluster_id"], identity["source"])
        self.positions = {}
        self.begin_catch_up()


def topic_ids(app: App, bootstrap: str, topics: Sequence[str], timeout: float = 10.0) -> Dict[str, str]:
    """Each topic's id (a topic deleted and created again has a new one, as has every
    topic of a fresh embedded broker, whose cluster id never changes).  A topic the broker
    does not describe is left out, and its copy kept as it is: logged."""
    if not topics:
        return {}
    from confluent_kafka import TopicCollection

    from .broker import admin_client

    ids: Dict[str, str] = {}
    admin = admin_client(app, bootstrap)  # alive until the answers came
    futures = admin.describe_topics(TopicCollection(list(topics)), request_timeout=timeout)
    for name, future in futures.items():
        try:
            ids[name] = str(future.result(timeout).topic_id)
        except Exception as exc:  # noqa: BLE001 - an old broker, an outage: not fatal
            ids.pop(name, None)
            log.warning("global tables: topic %s not described (%s): its copy is kept without "
                        "checking that it is the same topic", name, exc)
    return ids


class GlobalMirror:
    """Mirrors every global table of ``app`` in a thread of the supervisor."""

    def __init__(self, app: App, bootstrap: str, datadir: str, cluster_id: str) -> None:
        self.app = app
        self.bootstrap = bootstrap
        self.datadir = datadir
        self.cluster_id = cluster_id
        self.copies: List[TableCopy] = []
        self.consumer: Optional[Consumer] = None
        self.thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._partitions: Dict[str, List[int]] = {}
        self._last_metadata = 0.0
        #: the consumer must be assigned again, from the copies' positions
        self._resync = False
        self._warned: Dict[str, float] = {}

    # -- in the supervisor's main thread ------------------------------------------------
    def start(self) -> None:
        """Opens each copy (wiping one made from another cluster or topic), clears its
        caught-up mark and starts the thread.  Call it before any child is spawned."""
        ids = topic_ids(self.app, self.bootstrap, [t.topic.name for t in self.app.global_tables])
        for table in self.app.global_tables:
            path = global_dir(self.datadir, self.app.id, table.name)
            store = TaskStore(path, [table.name])
            try:
                topic = table.topic.name
                source = f"{topic} {ids[topic]}" if topic in ids else None
                if source is not None and store.ensure_identity(self.cluster_id, source):
                    log.warning("global table %s: the copy at %s came from another cluster or "
                                "another topic %s (deleted and created again since); reading "
                                "it from the beginning", table.name, path, topic)
                copy = TableCopy(table, store)
                copy.begin_catch_up()
            except BaseException:
                store.close()
                raise
            self.copies.append(copy)
            where = (", ".join(f"[{p}]@{o}" for p, o in sorted(copy.positions.items()))
                     or "the beginning")
            log.info("global table %s: mirroring topic %s into %s (from %s)", table.name,
                     copy.topic, path, where)
        if not self.copies:
            return
        self.consumer = Consumer(self.consumer_config())
        self.thread = threading.Thread(target=self._run, name="global-mirror", daemon=True)
        self.thread.start()

    def consumer_config(self) -> Dict[str, Any]:
        """No group membership (``assign()``), nothing committed, committed records only,
        an event at each partition's end."""
        return {
            **self.app.consumer_config(self.bootstrap),
            "group.id": f"{self.app.id}-global-mirror",  # never joins, never commits
            "client.id": f"{self.app.id}-global-mirror",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 100,
        }

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the thread (at its next batch) and closes the consumer and the copies."""
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                log.warning("the global tables' mirror did not stop within %.0fs", timeout)
                return
        for copy in self.copies:
            copy.store.close()
        self.copies = []

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        try:
            while not self._stop.is_set():
                try:
                    self.turn(consumer)
                except Exception:  # noqa: BLE001 - log, wait, go on from what LMDB holds
                    log.exception("global tables' mirror: a batch failed; reading again from "
                                  "the stored offsets in 1s")
                    self._stop.wait(1.0)
                    self._resync = True
        finally:
            try:
                consumer.close()
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.exception("closing the global tables' consumer")

    def turn(self, consumer: Consumer) -> None:
        """One turn of the thread: (re)assign what needs it, then one batch."""
        if self._resync:
            self._assign(consumer)
        self._refresh_partitions(consumer)
        try:
            self._step(consumer)
        except TopicRewound as exc:
            log.warning("global tables: %s (the topic was deleted and created again, or "
                        "truncated); reading it again from the beginning", exc)
            self._resync = True
            for copy in self.copies:
                if copy.topic == exc.topic:
                    copy.rewind()
                    copy.add_partitions(self._partitions.get(exc.topic, []))

    def _refresh_partitions(self, consumer: Consumer) -> None:
        """Learns each mirrored topic's partitions (at start, then every
        :data:`METADATA_EVERY` seconds for added ones) and assigns the new ones."""
        now = time.monotonic()
        topics = [c.topic for c in self.copies]
        if len(self._partitions) == len(topics) and now - self._last_metadata < METADATA_EVERY:
            return
        self._last_metadata = now
        for topic in topics:
            try:
                meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
            except KafkaException as exc:
                self._warn(f"metadata {topic}", f"global tables: no metadata for topic {topic}: {exc}")
                if topic not in self._partitions:
                    self._stop.wait(1.0)
                continue
            if meta is None or meta.error is not None or not meta.partitions:
                self._warn(f"metadata {topic}", f"global tables: topic {topic} not available "
                           f"({meta.error if meta is not None else 'unknown'})")
                continue
            new = [p for p in sorted(meta.partitions) if p not in self._partitions.get(topic, [])]
            if new:
                self._partitions[topic] = sorted(meta.partitions)
                for copy in self.copies:
                    if copy.topic == topic:
                        copy.add_partitions(new)
                self._resync = True
        if self._resync:
            self._assign(consumer)

    def _assign(self, consumer: Consumer) -> None:
        """Reads every known partition from where its copy is (what LMDB holds)."""
        positions = {c.topic: c.positions for c in self.copies}
        consumer.assign([assignable(topic, p, positions[topic].get(p, OFFSET_BEGINNING))
                         for topic, parts in self._partitions.items() for p in parts])
        self._resync = False

    def _step(self, consumer: Consumer) -> None:
        """One batch: records and end-of-partition events, applied to each copy."""
        messages = consumer.consume(BATCH, 0.2)
        records: Dict[str, List[Record]] = {}
        ends: Dict[str, Dict[int, int]] = {}
        for msg in messages:
            err = msg.error()
            if err is None:
                records.setdefault(msg.topic(), []).append(
                    (msg.partition(), msg.offset(), msg.key(), msg.value()))
            elif err.code() == KafkaError._PARTITION_EOF:
                ends.setdefault(msg.topic(), {})[msg.partition()] = msg.offset()
            else:
                self._warn(err.str(), f"global tables' consumer: {err.str()}")
        for copy in self.copies:
            if copy.caught_up and copy.topic not in records and copy.topic not in ends:
                continue
            for part in copy.unknown_ends():
                _low, high = consumer.get_watermark_offsets(TopicPartition(copy.topic, part),
                                                            cached=True)
                copy.observe_end(part, high)
            if copy.apply(records.get(copy.topic, []), ends.get(copy.topic, {})):
                log.info("global table %s: caught up with topic %s (%d records in %.2fs); "
                         "following it live", copy.name, copy.topic, copy.applied,
                         time.monotonic() - copy.began)
            if copy.keyless:
                self._warn(f"keyless {copy.name}", f"global table {copy.name}: records of topic "
                           f"{copy.topic} without a key are ignored ({copy.keyless} so far)")

    def _warn(self, what: str, text: str) -> None:
        """Logs ``text`` unless a warning about ``what`` was logged lately."""
        now = time.monotonic()
        if now - self._warned.get(what, -WARN_EVERY) >= WARN_EVERY:
            self._warned[what] = now
            log.warning("%s", text)
