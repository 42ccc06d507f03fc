"""The peers: other stream processors doing the same work on the same pre-produced topic of
the same broker, each in a process of its own started with the peers' virtualenv
(``.venv-peers`` in the repository root, gitignored, made on first use of ``--peers``: the
project's ``.venv`` never gets them).

    quix      Quix Streams (StreamingDataFrame; state: RocksDB with changelog topics)
    faust     faust-streaming (agents; tables: RocksDB via rocksdict, changelog topics)
    bytewax   Bytewax (Python operators on a Rust dataflow runtime; its Kafka connectors;
              state in memory, snapshots to SQLite for recovery), one process, one worker
    pathway   Pathway (a Rust engine; its Kafka connector), as a reference

Each peer's module (``bench.systems.<peer>``) is what runs in that process.  A peer that
cannot be installed, cannot be imported, or fails to process the records is reported as
"unavailable: <reason>"; the benchmark goes on and its exit code does not count it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from confluent_kafka import Consumer

from ..kafkaio import create_topics, preproduce_keyed
from ..measure import ROOT, SCRIPTS, compare, curve_rates
from ..workloads.stateful import StateRun
from ..workloads.stateless import Run

PEERS = ("quix", "faust", "bytewax", "pathway")
LABELS = {"quix": "Quix Streams", "faust": "Faust", "bytewax": "Bytewax (1 proc)",
          "pathway": "Pathway"}
#: what pip installs, and what must then import
PACKAGES = {"quix": "quixstreams", "faust": "faust-streaming", "bytewax": "bytewax",
            "pathway": "pathway"}
IMPORTS = {"quix": "quixstreams", "faust": "faust", "bytewax": "bytewax.connectors.kafka",
           "pathway": "pathway"}
#: Quix reads the input topic's retention settings to derive its changelog topics'; tansu
#: reports only what was set at creation
PEER_TOPIC_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1"}
EXTRA = ["matplotlib"]
#: peers that produce their outputs in large batches after processing them (Pathway: all
#: records read so far in one batch, then written): the stateless rate is timed from their
#: first record processed (their own clock) to the last output's CreateTime
FIRST_BY_OWN_CLOCK = ("pathway",)  # for the plot (the project's .venv does not have it)
VENV = os.path.join(ROOT, ".venv-peers")
_versions: Dict[str, str] = {}


def python() -> str:
    return os.path.join(VENV, "bin", "python")


def peer_of(kind: str) -> Optional[str]:
    name = kind[6:] if kind.startswith("state-") else kind
    return name if name in PEERS else None


def one_line(text: str) -> str:
    """The most telling line of an error output: the last exception line, else the last."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", line)]
    return ((errors or lines or ["no output"])[-1])[:200]


def _probe(peer: str) -> str:
    """'' when the peer's package imports in the virtualenv, else why not."""
    code = (f"import importlib.metadata as m, {IMPORTS[peer]}; "
            f"print(m.version({PACKAGES[peer]!r}))")
    try:
        out = subprocess.run([python(), "-c", code], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if out.returncode != 0:
        return f"import {IMPORTS[peer]} failed: {one_line(out.stderr)}"
    _versions[peer] = out.stdout.strip()
    return ""


def ensure_venv(wanted: List[str]) -> Tuple[str, Dict[str, str]]:
    """Creates the peers' virtualenv if needed and installs what is missing; returns its
    python and {peer: why it is unavailable}."""
    if not os.path.exists(python()):
        print(f"creating the peers' virtualenv {VENV} (once) ...", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        made = subprocess.run([base, "-m", "venv", VENV], capture_output=True, text=True)
        if made.returncode != 0:
            return "", {p: f"cannot create {VENV}: {one_line(made.stderr)}" for p in wanted}
    missing = {p: _probe(p) for p in wanted}
    todo = [PACKAGES[p] for p, why in missing.items() if why]
    have_plot = subprocess.run([python(), "-c", "import matplotlib"],
                               capture_output=True).returncode == 0
    todo += [] if have_plot else EXTRA
    unavailable: Dict[str, str] = {}
    for package in todo:  # one at a time: one that fails does not stop the others
        print(f"pip install {package} into {os.path.relpath(VENV, ROOT)} ...", flush=True)
        done = subprocess.run([python(), "-m", "pip", "install", "-q", package],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            peer = next((p for p, pkg in PACKAGES.items() if pkg == package), None)
            if peer:
                unavailable[peer] = f"pip install {package} failed: {one_line(done.stderr)}"
    for p in wanted:
        if p not in unavailable and missing[p]:
            why = _probe(p)
            if why:
                unavailable[p] = why
    return python(), unavailable


def describe(peer_python: str, peer: str) -> str:
    return f"{PACKAGES[peer]} {_versions.get(peer, '?')} ({peer_python})"


def peer_command(peer_python: str, peer: str, workload: str, run: Any, workdir: str
                 ) -> List[str]:
    args = run.args
    return [peer_python, "-m", f"bench.systems.{peer}", "--workload", workload,
            "--bootstrap", run.bootstrap, "--prefix", run.prefix,
            "--records", str(args.records), "--partitions", str(args.partitions),
            "--keys", str(args.keys), "--workdir", workdir]


def stats_files(stats_dir: str) -> List[str]:
    return [os.path.join(stats_dir, n) for n in sorted(os.listdir(stats_dir))
            if n.startswith("stats-") and n.endswith(".json")]


class PeerRun(Run):
    """A peer in the stateless workload: timed like raw and cN, by its output records'
    CreateTime; done when its process wrote its stats file (after the N-th record) or
    exited; then stopped with SIGTERM (killed 20 s later)."""
    check_rc = False
    topic_config = PEER_TOPIC_CONFIG

    def __init__(self, kind: str, args: argparse.Namespace, bootstrap: str, broker_pid: int,
                 iters: int, workdir: str, peer_python: str) -> None:
        super().__init__(kind, args, bootstrap, broker_pid, iters, workdir)
        self.peer = kind
        self.peer_python = peer_python
        self.is_shardsup = False
        self.exits_by_itself = False

    def command(self) -> List[str]:
        own = os.path.join(self.workdir, f"{self.prefix}-own")
        return peer_command(self.peer_python, self.peer, "stateless", self, own)

    def finished(self, proc: subprocess.Popen, watcher: Consumer) -> bool:
        return proc.poll() is not None or bool(stats_files(self.stats_dir))

    def stop_timeout(self) -> float:
        return min(self.args.stop_timeout, 20.0)

    def execute(self) -> Dict[str, Any]:
        res = super().execute()
        res["timing"] = "outputs"
        files = stats_files(self.stats_dir)
        if self.peer in FIRST_BY_OWN_CLOCK and files and res.get("t_last_out"):
            with open(files[0]) as f:
                first = json.load(f)["first"]
            res["rate"] = self.args.records / (res["t_last_out"] - first)
            res.pop("mid_rate", None)
            res.pop("other_us", None)
            res["timing"] = "own clock first → last output"
        if not res["ok"]:
            res["unavailable"] = failure_line(res["note"])
        return res


def failure_line(note: str) -> str:
    """One line for a peer that failed: the benchmark's note, and the last exception line of
    the peer's log if it has one."""
    head, _sep, tail = note.partition("log tail")
    head = head.strip().rstrip(";")
    errors = [line.strip() for line in tail.splitlines()
              if re.match(r"^[\w.]*(Error|Exception)\b", line.strip())]
    return (f"{errors[-1][:160]} ({head})" if errors else head)[:300]


class PeerStateRun(StateRun):
    """A peer in the stateful workload (count and sum per key in the peer's own state):
    timed by the peer's own clock, first record → N-th record applied (as state-raw); exact
    when each key's state after its last record equals the truth."""

    def __init__(self, kind: str, args: argparse.Namespace, bootstrap: str, broker_pid: int,
                 workdir: str, truth: Tuple[Dict[str, int], Dict[str, int]],
                 peer_python: str) -> None:
        super().__init__(kind, args, bootstrap, broker_pid, workdir, truth)
        self.peer = kind[6:]
        self.peer_python = peer_python

    def execute(self) -> Dict[str, Any]:
        args, res = self.args, self.result
        n = args.records
        res["timing"] = "own clock"
        create_topics(self.bootstrap, [self.in_topic], args.partitions, PEER_TOPIC_CONFIG)
        res["produce_s"], _ends, note = preproduce_keyed(self.bootstrap, self.in_topic, n,
                                                         args.keys)
        res["note"] += note
        log_path = os.path.join(self.workdir, f"{self.prefix}.log")
        cmd = peer_command(self.peer_python, self.peer, "stateful", self, self.datadir)
        with open(log_path, "wb") as log:
            cpu = self._cpu_start()
            launch = time.time()
            proc = subprocess.Popen(cmd, cwd=SCRIPTS, env=self.env(True), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log)
            try:
                deadline = time.monotonic() + args.timeout
                while time.monotonic() < deadline and proc.poll() is None \
                        and not stats_files(self.stats_dir):
                    time.sleep(0.25)
            finally:
                res["stop_s"], res["rc"] = self.stop_peer(proc)
                self._cpu_end(cpu)
        files = stats_files(self.stats_dir)
        if not files:
            res["note"] += (f"the peer did not process {n:,} records within {args.timeout:.0f}s "
                            f"(exit code {res['rc']}); " + self.log_tail(log_path))
            res["unavailable"] = failure_line(res["note"])
            return res
        with open(files[0]) as f:
            inner = json.load(f)
        res["received"] = inner["seen"]
        res["procs"] = len(files)
        res["child_cpu_s"] = inner["cpu_s"]
        points = [(inner["first"], 0)] + [tuple(p) for p in inner["points"]]
        res.update(curve_rates(points, n))  # type: ignore[arg-type]
        if self.peer in FIRST_BY_OWN_CLOCK:  # its updates come in batches: no curve
            res.pop("mid_rate", None)
            res["rate"] = n / (inner["last"] - inner["first"])
        res["startup_s"] = inner["first"] - launch
        final = inner["final"]
        problems = [f"{t}: {diff}" for i, t in enumerate(("counts", "sums"))
                    if (diff := compare({k: v[i] for k, v in final.items()}, self.truth[t]))]
        res["exact"] = not problems
        if problems:
            res["note"] += "NOT EXACT: " + "; ".join(problems) + "; "
        res["ok"] = inner["seen"] == n and res["exact"]
        return res

    def stop_peer(self, proc: subprocess.Popen) -> Tuple[float, Optional[int]]:
        saved = self.args.stop_timeout
        self.args.stop_timeout = min(saved, 20.0)
        try:
            return self.stop(proc)
        finally:
            self.args.stop_timeout = saved
