"""The stateless workload: json.loads → ``work.result`` (~20 µs of pure Python, calibrated)
→ a small JSON result produced to the output topic with the input's key.

One :class:`Run` per measured run: ``raw`` (systems/raw.py), ``cN`` (shardsup -c N,
systems/shardsup.py) and the peers (systems/peers.py subclasses it).  Timing from the output
records' CreateTime; see docs/benchmark.md."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any, Dict, List, Optional

from confluent_kafka import TIMESTAMP_CREATE_TIME, Consumer

from ..kafkaio import committed_total, create_topics, preproduce, read_outputs
from ..measure import SCRIPTS, children_cpu, machine_cpu, self_cpu, tree_cpu
from ..systems import shardsup

AIM_C1_VS_RAW = 0.85
AIM_C2_VS_C1 = 1.6


# -- one measured run -----------------------------------------------------------------------
class Run:
    """One stateless run: ``raw`` or ``cN``; peers subclass it (systems/peers.py)."""
    #: the process exits by itself when done (the raw loop) or is stopped with SIGTERM
    exits_by_itself = False
    #: a run is complete only when its process also exited with code 0
    check_rc = True
    #: topic settings (None: the broker's defaults; the peers ask for some explicitly)
    topic_config: Optional[Dict[str, str]] = None

    def __init__(self, kind: str, args: argparse.Namespace, bootstrap: str, broker_pid: int,
                 iters: int, workdir: str) -> None:
        self.kind = kind
        self.args = args
        self.bootstrap = bootstrap
        self.broker_pid = broker_pid
        self.iters = iters
        self.prefix = f"b{uuid.uuid4().hex[:8]}{kind}"
        self.in_topic = f"{self.prefix}-in"
        self.out_topic = f"{self.prefix}-out"
        self.workdir = workdir
        self.stats_dir = os.path.join(workdir, f"{self.prefix}-stats")
        os.makedirs(self.stats_dir)
        self.result: Dict[str, Any] = {"run": kind, "ok": False, "note": ""}
        self.exits_by_itself = kind == "raw"
        self.is_shardsup = kind != "raw"

    def env(self) -> Dict[str, str]:
        return {**os.environ, "BENCH_PREFIX": self.prefix, "BENCH_STATS_DIR": self.stats_dir,
                "BENCH_PARTITIONS": str(self.args.partitions),
                "BENCH_WORK_ITERS": str(self.iters)}

    def command(self) -> List[str]:
        if self.kind == "raw":
            return [sys.executable, "-m", "bench", "--raw-child",
                    "--bootstrap", self.bootstrap, "--prefix", self.prefix,
                    "--records", str(self.args.records), "--partitions", str(self.args.partitions),
                    "--timeout", str(self.args.timeout)]
        return shardsup.start_command("bench_app", self.bootstrap,
                                      os.path.join(self.workdir, self.prefix),
                                      int(self.kind[1:]), self.args.loglevel)

    def finished(self, proc: subprocess.Popen, watcher: Consumer) -> bool:
        """Whether the run is done: the raw loop exits once its N outputs are acknowledged;
        shardsup has committed all N inputs (it commits only after their outputs are
        acknowledged)."""
        return proc.poll() is not None or (
            self.is_shardsup
            and committed_total(watcher, self.in_topic, self.args.partitions) >= self.args.records)

    def stop_timeout(self) -> float:
        return self.args.stop_timeout

    def execute(self) -> Dict[str, Any]:
        args, res = self.args, self.result
        n, parts = args.records, args.partitions
        create_topics(self.bootstrap, [self.in_topic, self.out_topic], parts, self.topic_config)
        res["produce_s"] = preproduce(self.bootstrap, self.in_topic, n, parts)

        log_path = os.path.join(self.workdir, f"{self.prefix}.log")
        log = open(log_path, "wb")
        # asks for the app's committed offsets (same group id, never subscribes)
        watcher = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.prefix,
                            "enable.auto.commit": False})
        cpu0, broker0 = children_cpu(), tree_cpu(self.broker_pid)
        (busy0, steal0), self0 = machine_cpu(), self_cpu()
        launch = time.time()
        proc = subprocess.Popen(self.command(), cwd=SCRIPTS, env=self.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if self.kind == "raw" else log,
                                stderr=log)
        first: Dict[int, int] = {}
        state: Dict[str, Any] = {"messages": 0, "ts_kinds": set()}
        reader: Optional[Consumer] = None
        try:
            # 1. wait (cheaply) until all N inputs are committed (shardsup) or the process
            #    ends (the raw loop exits once its N outputs are acknowledged)
            deadline = time.monotonic() + args.timeout
            done = False
            while not done and time.monotonic() < deadline:
                done = self.finished(proc, watcher)
                if not done:
                    time.sleep(0.25)
            # 2. read it all and check every record is there: when the run is done they all
            #    are (acknowledged); a short grace otherwise, to report what did arrive
            reader = read_outputs(self.bootstrap, self.out_topic, parts, n,
                                  60.0 if done else 10.0, first, state)
            res["received"] = len(first)
            res["messages"] = state["messages"]
        finally:
            # 3. stop what we started: SIGTERM to this pid only, then wait for it
            stop0 = time.monotonic()
            if not self.exits_by_itself and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                raw_out, _ = proc.communicate(timeout=self.stop_timeout()) if self.kind == "raw" \
                    else (None, proc.wait(self.stop_timeout()))
            except subprocess.TimeoutExpired:
                res["note"] += f"did not exit {self.stop_timeout():.0f}s after SIGTERM: killed; "
                proc.kill()  # its pid only; shardsup children die with it (PR_SET_PDEATHSIG)
                raw_out, _ = proc.communicate(timeout=30)
            res["stop_s"] = time.monotonic() - stop0
            res["rc"] = proc.returncode
            log.close()
            for consumer in (reader, watcher):
                if consumer is not None:
                    consumer.close()
        res["cpu_s"] = children_cpu() - cpu0
        res["broker_cpu_s"] = tree_cpu(self.broker_pid) - broker0
        # CPU that processes outside this benchmark used meanwhile: noise, if not ~0
        busy1, steal1 = machine_cpu()
        res["foreign_cpu_s"] = (busy1 - busy0) - res["cpu_s"] - res["broker_cpu_s"] \
            - (self_cpu() - self0)
        res["steal_s"] = steal1 - steal0

        # what the processing processes said at exit: time inside result(), own CPU
        stats = []
        for name in sorted(os.listdir(self.stats_dir)):
            if not (name.startswith("stats-") and name.endswith(".json")):
                continue
            with open(os.path.join(self.stats_dir, name)) as f:
                stats.append(json.load(f))
        if stats:
            res["procs"] = len(stats)
            res["work_us"] = 1e6 * sum(s["work_s"] for s in stats) / sum(s["records"] for s in stats)
            res["proc_cpu_us"] = 1e6 * sum(s["cpu_s"] for s in stats) / sum(s["records"] for s in stats)
            if self.is_shardsup:  # the tree's CPU less its children's: the supervisor's
                res["sup_cpu_s"] = res["cpu_s"] - sum(s["cpu_s"] for s in stats)
        if self.kind == "raw" and raw_out:
            try:
                inner = json.loads(raw_out.decode().strip().splitlines()[-1])
                res["inner_rate"] = inner["records"] / max(1e-9, inner["done"] - inner["first"])
                res["inner_flush_s"] = inner["done"] - inner["last_produced"]
            except (ValueError, KeyError, IndexError):
                pass
        if state["ts_kinds"] - {TIMESTAMP_CREATE_TIME}:
            res["note"] += ("output timestamps are not all CreateTime "
                            f"(kinds {sorted(state['ts_kinds'])}); ")
        if first:
            t_first, t_last = min(first.values()) / 1000.0, max(first.values()) / 1000.0
            res["startup_s"] = t_first - launch
            res["t_first_out"], res["t_last_out"] = t_first, t_last

            res["span_s"] = t_last - t_first
            res["rate"] = n / res["span_s"] if res["span_s"] > 0 else float("nan")
            stamps = sorted(first.values())
            lo, hi = stamps[len(stamps) // 10], stamps[(len(stamps) * 9) // 10 - 1]
            if hi > lo:  # the middle 80% of the results: without ramp-up and tail
                res["mid_rate"] = (len(stamps) * 8 // 10) / ((hi - lo) / 1000.0)
            # the longest pause in the output, and after how many results it came
            gap, at = max(((b - a, k + 1) for k, (a, b) in enumerate(zip(stamps, stamps[1:]))),
                          default=(0, 0))
            res["pause_s"], res["pause_at"] = gap / 1000.0, at
        if res.get("rate") and res.get("work_us"):
            # wall time per record in one processing process that was not spent in result()
            res["other_us"] = res["procs"] * 1e6 / res["rate"] - res["work_us"]
        if first and min(first.values()) / 1000.0 < launch - 0.01:
            # a system that copies the input's timestamp to its output: not its times
            res["note"] += "output timestamps precede the launch (the inputs' copied?); "
            for key in ("startup_s", "span_s", "rate", "mid_rate", "pause_s", "other_us"):
                res.pop(key, None)
            res["ok"] = False
        elif len(first) != n:
            res["note"] += f"only {len(first)} of {n} distinct records arrived; "
        elif res["rc"] != 0 and self.check_rc:
            res["note"] += f"exit code {res['rc']}; "
        else:
            res["ok"] = True
        if res["messages"] > len(first):
            res["note"] += f"{res['messages'] - len(first)} duplicate outputs; "
        if not res["ok"]:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = f.read()[-2000:]
            res["note"] += f"log tail ({log_path}):\n{tail}"
        return res

