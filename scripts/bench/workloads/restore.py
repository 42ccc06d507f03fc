"""The restore workload (``state-restore``): ONE task restores a synthetic changelog of
``--restore-records`` records (1,000,000; distinct keys, 100 records per source offset, as
in tests/unit/test_tables_units.py) with the group's input offset committed past them, timed by
the child's "restored N changelog records ... in X s" line; beside it ``apply_changelog``
alone (LMDB, no Kafka) and a bare consume loop over the same changelog.  See
docs/benchmark.md."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Dict

from confluent_kafka import Consumer, Producer, TopicPartition

from shardworker.changelog import HDR_SRC_OFFSET, HDR_SRC_PARTITION, HDR_SRC_TOPIC
from shardworker.produce import produce
from shardworker.restore import apply_changelog
from shardworker.state import task_dir
from shardworker.store import TaskStore, open_readonly

from ..kafkaio import bare_consume_rate, create_topics
from ..measure import STATE_TABLES
from .stateful import StateRun


class RestoreRun(StateRun):
    """``state-restore``."""

    def execute(self) -> Dict[str, Any]:
        """A changelog of M records (distinct keys, batches of 100 records per source offset,
        as tests/unit/test_tables_units.py's measurement) on partition 0 of the counts table,
        the group's input offset committed past all of them, and a new supervisor whose
        task 0_0 restores them.  Also times apply_changelog alone on the same records."""
        args, res = self.args, self.result
        m = args.restore_records
        parts = args.partitions
        topic = f"{self.prefix}-counts-changelog"
        create_topics(self.bootstrap, [self.in_topic], parts)
        create_topics(self.bootstrap, [f"{self.prefix}-{t}-changelog" for t in STATE_TABLES],
                      parts, {"cleanup.policy": "compact"})
        committed = (m - 1) // 100 + 1
        records = [(b'"k%07d"' % (i * 7919 % m), b"%d" % i,
                    [(HDR_SRC_TOPIC, self.in_topic.encode()), (HDR_SRC_PARTITION, b"0"),
                     (HDR_SRC_OFFSET, b"%d" % (i // 100))]) for i in range(m)]
        # 1. apply_changelog alone (LMDB, no Kafka): the unit-level figure
        with tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp:
            store = TaskStore(os.path.join(tmp, "s"), ["counts"], sync=False)  # as the child
            t0 = time.perf_counter()
            applied, _skipped = apply_changelog(store, "counts", records,
                                                {(self.in_topic, 0): committed})
            res["unit_s"] = time.perf_counter() - t0
            res["unit_records"] = applied
            res["unit_rate"] = applied / res["unit_s"]
            store.close()
        # 2. the changelog on the broker, and the group's committed input offset
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 20,
                             "enable.idempotence": True, "queue.buffering.max.messages": 500_000,
                             "batch.num.messages": 10_000})
        t0 = time.monotonic()
        for i, (key, value, headers) in enumerate(records):
            produce(producer, topic, value, key, headers, partition=0)
            if i % 10_000 == 0:
                producer.poll(0)
        if producer.flush(180):
            raise RuntimeError("the synthetic changelog was not acknowledged")
        res["produce_s"] = time.monotonic() - t0
        del records
        # 2b. the baseline: a bare consumer reading what restore reads, applying nothing
        res["consume_rate"] = bare_consume_rate(self.bootstrap, topic, m)
        committer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.prefix,
                              "enable.auto.commit": False})
        try:
            committer.commit(offsets=[TopicPartition(self.in_topic, 0, committed)],
                             asynchronous=False)
        finally:
            committer.close()
        # 3. a supervisor whose only task with a committed offset (0_0) restores it
        cpu = self._cpu_start()
        self.measure_restore(expect_tasks=1, verify=False)
        self._cpu_end(cpu)
        store = open_readonly(task_dir(self.datadir, self.prefix, "0_0"))
        try:
            keys, offset = store.count("counts"), store.input_offset(self.in_topic, 0)
        finally:
            store.close()
        if keys != m or offset != committed:
            res["restore_exact"] = False
            res["note"] += (f"restored store has {keys} keys (want {m}) and input offset "
                            f"{offset} (want {committed}); ")
        res["ok"] = bool(res.get("restore_exact")) and res.get("restore_records") == m
        return res


