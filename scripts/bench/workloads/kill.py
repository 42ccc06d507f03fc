"""The kill workload (``state-kill``): kill -9 of a busy child → the task's next processed
record, with ``--kill-keys`` keys (100,000) in the tables, once with the child's LMDB kept
("resume") and once with the task stores deleted just before the kill (a full restore).
Timed from the kill to the CreateTime of the first changelog record written after it.  See
docs/benchmark.md."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from typing import Any, Dict, Optional

from confluent_kafka import Consumer

from ..kafkaio import committed_offsets, create_topics, preproduce_keyed, read_changelog
from .stateful import StateRun


class KillRun(StateRun):
    """``state-kill``."""

    def execute(self) -> Dict[str, Any]:
        """kill -9 of a busy child → its tasks' next processed record, with
        ``--kill-keys`` keys in the tables, the LMDB stores kept ("resume") and deleted
        just before the kill ("wiped": what the old wipe of a state ahead of the group's
        offset cost).  See docs/benchmark.md (state-kill)."""
        args, res = self.args, self.result
        keys, extra, parts = args.kill_keys, args.kill_extra, args.partitions
        create_topics(self.bootstrap, [self.in_topic], parts)
        res["produce_s"], ends, note = preproduce_keyed(self.bootstrap, self.in_topic, keys, keys)
        res["note"] += note
        produced = keys
        watcher = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.prefix,
                            "enable.auto.commit": False})
        try:
            # 1. the tables get their keys
            with open(os.path.join(self.workdir, f"{self.prefix}-fill.log"), "wb") as log:
                proc = self.start_supervisor(1, log, "info", json_logs=False, stats=False)
                try:
                    if not self._committed_reach(watcher, ends, proc):
                        res["note"] += "the first records were not committed; "
                        return res
                finally:
                    self.stop(proc)
            # 2. per mode: a backlog, a supervisor busy with it, the kill
            for mode in ("resume", "wiped"):
                before = sum(committed_offsets(watcher, self.in_topic, parts).values())
                _s, ends, _n = preproduce_keyed(self.bootstrap, self.in_topic, extra, keys)
                produced += extra
                log_path = os.path.join(self.workdir, f"{self.prefix}-{mode}.log")
                with open(log_path, "wb") as log:
                    proc = self.start_supervisor(1, log, "info", json_logs=False, stats=False)
                    try:
                        killed = self._kill_when_busy(watcher, before, proc, mode == "wiped")
                        if killed is None or not self._committed_reach(watcher, ends, proc):
                            res["note"] += f"{mode}: no kill or no recovery; {self.log_tail(log_path)}"
                            return res
                    finally:
                        self.stop(proc)
                res[f"kill_{mode}_s"] = self._first_changelog_after(killed) - killed
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    after = f.read().split("died with code -9", 1)[-1]
                res[f"kill_{mode}_restored"] = sum(
                    int(n) for n in re.findall(r"restored (\d+) changelog records", after))
                # tasks whose LMDB was ahead of the group's offset (read on from it) and
                # tasks whose LMDB was exactly at it (the kill fell between two reports)
                res[f"kill_{mode}_ahead"] = after.count("resumed from local state")
                res[f"kill_{mode}_at_offset"] = after.count("local state is at the group's offset")
        finally:
            watcher.close()
        counts = self.table_cli("counts")
        res["exact"] = len(counts) == keys and sum(counts.values()) == produced
        if not res["exact"]:
            res["note"] += (f"NOT EXACT: {len(counts)} keys (want {keys}), counts sum to "
                            f"{sum(counts.values())} (want {produced}); ")
        res["ok"] = res["exact"]
        return res

    def _committed_reach(self, watcher: Consumer, ends: Dict[int, int],
                         proc: subprocess.Popen) -> bool:
        """Waits (bounded) until the group's committed offsets reach ``ends``."""
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline and proc.poll() is None:
            got = committed_offsets(watcher, self.in_topic, self.args.partitions)
            if all(got.get(p, 0) >= ends.get(p, 0) for p in range(self.args.partitions)):
                return True
            time.sleep(0.1)
        return False

    def _kill_when_busy(self, watcher: Consumer, before: int, proc: subprocess.Popen,
                        delete_stores: bool) -> Optional[float]:
        """SIGKILL to the supervisor's child once the group's offsets move past ``before``
        (it works through its backlog); with ``delete_stores`` its task stores are
        removed first.  Returns the time of the kill (epoch s), None if it never got busy."""
        import psutil

        deadline = time.monotonic() + self.args.timeout
        while sum(committed_offsets(watcher, self.in_topic, self.args.partitions).values()) <= before:
            if time.monotonic() > deadline or proc.poll() is not None:
                return None
            time.sleep(0.05)
        kids = [k for k in psutil.Process(proc.pid).children()
                if " child " in " ".join(k.cmdline())]
        if len(kids) != 1:
            return None
        if delete_stores:
            shutil.rmtree(os.path.join(self.datadir, self.prefix, "tasks"), ignore_errors=True)
        killed = time.time()
        os.kill(kids[0].pid, signal.SIGKILL)
        return killed

    def _first_changelog_after(self, moment: float) -> float:
        """CreateTime (epoch s) of the first changelog record written after ``moment``."""
        rows = read_changelog(self.bootstrap, f"{self.prefix}-counts-changelog", 60.0)
        return min(ts for _kind, ts, *_rest in rows if ts >= moment * 1000) / 1000.0


