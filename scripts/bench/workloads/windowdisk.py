"""A windowed table over hours of event time: its task's LMDB file stays bounded by
``expires`` (issue 14, point 8).

Run from the repository root::

    .venv/bin/python -m scripts.bench.workloads.windowdisk                 # 5 simulated hours
    .venv/bin/python -m scripts.bench.workloads.windowdisk --hours 24 --keys-per-window 1000

One task, in this process, without Kafka: a ``TaskTables`` over a real ``TaskStore`` (LMDB,
in a temporary directory) with one table, ``table.tumbling(10, expires=600)``, driven
through the worker's per-record path (``TableContext.set_message`` with the record's event
time, as for a topic with ``timestamp=fn``; then ``wt[key] += 1``) and drained, produced
(to a producer that acknowledges at once) and committed like the worker does, every
``--drain-every`` records.  Event time advances through simulated time: window after
window of ``--window`` seconds, each holding one record for each of ``--keys-per-window``
keys taken in turn from ``--keys`` distinct keys (all of them when the two are equal),
evenly spaced in the window.

Every ``--report-minutes`` of simulated time it prints and keeps: the size of
``data.mdb`` (apparent and allocated), LMDB's pages (``env.info()['last_pgno']``, the pages
the B-trees use from ``stat``, the rest free for reuse), the live window entries, and the
process's resident memory (anonymous: the Python heap; file: the mapped LMDB pages).
Bounded means: once stream time is past ``expires`` + a window, every window written is
deleted again ``expires`` later, the entries stop growing, LMDB reuses the freed pages
and the file (which never shrinks) stops growing; the Python heap stops growing once
the task's cache of committed entries has filled and started over (:func:`warm_up_s`).
The verdict compares the last report with the first report after that warm-up
(``--tolerance``); the exit code is 1 when the file, the entries or the memory kept
growing.

The whole result goes to ``bench-results/windowdisk-<timestamp>.json`` (gitignored).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from scripts.bench.workloads.inprocess import AckingProducer  # noqa: E402
from shardworker.changelog import produce_batch  # noqa: E402
from shardworker.store import TaskStore  # noqa: E402
from shardworker.tables import Table  # noqa: E402
from shardworker.tablecontext import CONTEXT  # noqa: E402
from shardworker.tasktables import CLEAN_CACHE_SIZE, TaskTables  # noqa: E402

TABLE = "clicks"
#: first window of the simulation (epoch ms; a multiple of any window size in whole seconds
#: up to an hour)
START_MS = 1_700_002_800_000


class Message:
    """The parts of a consumed message ``set_message`` reads; one instance is reused."""

    __slots__ = ("offset_", "key_")

    def __init__(self) -> None:
        self.offset_, self.key_ = -1, b""

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.offset_

    def key(self) -> bytes:
        return self.key_

    def timestamp(self) -> Tuple[int, int]:
        return 0, -1  # unused: the event time is passed to set_message


def rss_kib() -> Dict[str, int]:
    """Resident memory of this process (KiB): total, anonymous, file-backed, peak."""
    out: Dict[str, int] = {}
    wanted = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in wanted:
                out[wanted[name]] = int(rest.split()[0])
    return out


def disk(store: TaskStore) -> Dict[str, int]:
    """``data.mdb`` on disk and LMDB's page accounting: the pages the environment spans
    (last_pgno + 1), the pages its B-trees use (main, meta and table databases) and the
    difference (free pages waiting for reuse, plus LMDB's two meta pages and the
    freelist's own pages)."""
    env = store.env
    st = os.stat(os.path.join(store.path, "data.mdb"))
    info, main = env.info(), env.stat()
    psize = int(main["psize"])

    def pages(s: Dict[str, int]) -> int:
        return int(s["branch_pages"]) + int(s["leaf_pages"]) + int(s["overflow_pages"])

    used = pages(main)
    entries = 0
    with env.begin() as txn:
        for name, _ in list(txn.cursor()):
            s = txn.stat(env.open_db(name, txn=txn, create=False))
            used += pages(s)
            if name == TABLE.encode():
                entries = int(s["entries"])
    spanned = int(info["last_pgno"]) + 1
    return {"file_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512,
            "page_size": psize, "last_pgno": int(info["last_pgno"]), "pages_spanned": spanned,
            "pages_used": used, "pages_free": spanned - used, "map_size": int(info["map_size"]),
            "entries": entries}


def simulate(args: argparse.Namespace, where: str) -> List[Dict[str, Any]]:
    """Drives the task through ``args.hours`` of event time; returns the reports."""
    window_ms = int(args.window * 1000)
    per_window = args.keys_per_window * args.updates_per_key
    step_ms = window_ms / per_window
    windows = int(round(args.hours * 3600 * 1000 / window_ms))
    report_every = max(1, int(round(args.report_minutes * 60 * 1000 / window_ms)))
    keys = [f"user-{i}".encode() for i in range(args.keys)]
    names = [k.decode() for k in keys]

    table = Table(TABLE, default=int, key_serializer="str", app_id="bench")
    wt = table.tumbling(args.window, expires=args.expires, grace=args.grace)
    store = TaskStore(os.path.join(where, "0_0"), [TABLE], sync=False)
    task = TaskTables(store, [table], 0, "in", None, task_id="0_0")
    producer, errors = AckingProducer(), []  # type: ignore[var-annotated]
    msg = Message()
    reports: List[Dict[str, Any]] = []
    offset = since_drain = 0
    began_cpu, began_wall = time.process_time(), time.monotonic()
    set_message = CONTEXT.set_message

    def drain() -> None:
        batch = task.drain({("in", 0): offset})
        produce_batch(producer, batch, errors)  # type: ignore[arg-type]
        batch.commit()
        assert not errors, errors

    try:
        for w in range(windows):
            base = START_MS + w * window_ms
            first = w * args.keys_per_window
            for j in range(per_window):
                i = (first + j % args.keys_per_window) % args.keys
                msg.offset_, msg.key_ = offset, keys[i]
                set_message(task, msg, base + int(j * step_ms))
                wt[names[i]] += 1
                offset += 1
                since_drain += 1
                if since_drain >= args.drain_every:
                    drain()
                    since_drain = 0
            if (w + 1) % report_every == 0 or w + 1 == windows:
                drain()
                since_drain = 0
                CONTEXT.clear()
                row = {"sim_hours": round((w + 1) * window_ms / 3_600_000, 4),
                       "records": offset, "cpu_s": round(time.process_time() - began_cpu, 2),
                       "wall_s": round(time.monotonic() - began_wall, 2),
                       "changelog_records": producer.produced, **disk(store),
                       **{f"rss_{k}_kib": v for k, v in rss_kib().items()}}
                reports.append(row)
                print_row(row, first=len(reports) == 1)
        return reports
    finally:
        CONTEXT.clear()
        task.close()


def print_row(row: Dict[str, Any], first: bool) -> None:
    if first:
        print(f"{'sim h':>6} {'records':>11} {'entries':>9} {'data.mdb MiB':>12} "
              f"{'alloc MiB':>9} {'last_pgno':>9} {'used pg':>8} {'free pg':>8} "
              f"{'RSS MiB':>7} {'anon MiB':>8} {'file MiB':>8} {'cpu s':>7}", flush=True)
    mib = 1 << 20
    print(f"{row['sim_hours']:>6.2f} {row['records']:>11,} {row['entries']:>9,} "
          f"{row['file_bytes'] / mib:>12.2f} {row['allocated_bytes'] / mib:>9.2f} "
          f"{row['last_pgno']:>9,} {row['pages_used']:>8,} {row['pages_free']:>8,} "
          f"{row['rss_rss_kib'] / 1024:>7.1f} {row['rss_anon_kib'] / 1024:>8.1f} "
          f"{row['rss_file_kib'] / 1024:>8.1f} {row['cpu_s']:>7.1f}", flush=True)


def warm_up_s(args: argparse.Namespace) -> float:
    """Simulated seconds before the measures can be flat: the first windows must have
    expired (``expires`` + a window), and the task's cache of committed entries
    (``CLEAN_CACHE_SIZE`` per table, emptied when full; one entry per key and window
    here) must have filled and started over twice, or the Python heap is still growing
    towards its plateau."""
    cache_cycle = CLEAN_CACHE_SIZE / args.keys_per_window * args.window
    return max(args.expires + args.window, 2 * cache_cycle)


def verdict(reports: List[Dict[str, Any]], args: argparse.Namespace) -> Dict[str, Any]:
    """Bounded when, from the first report past the warm-up (:func:`warm_up_s` + a
    report interval) to the last, neither the file, the pages spanned, the entries nor
    the anonymous resident memory (its peak) grew by more than ``--tolerance``."""
    warm_h = warm_up_s(args) / 3600 + args.report_minutes / 60
    after = [r for r in reports if r["sim_hours"] >= warm_h]
    if len(after) < 2:
        return {"bounded": None, "why": "too few reports after the warm-up "
                f"({warm_h:.2f} h): run longer"}
    ref, last = after[0], after[-1]
    growth = {k: last[k] / ref[k] - 1 for k in ("file_bytes", "pages_spanned", "entries")}
    peak_anon = max(r["rss_anon_kib"] for r in after)
    growth["rss_anon"] = peak_anon / ref["rss_anon_kib"] - 1
    bounded = all(g <= args.tolerance for g in growth.values())
    return {"bounded": bounded, "from_hours": ref["sim_hours"], "to_hours": last["sim_hours"],
            "growth": {k: round(v, 4) for k, v in growth.items()}}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=5.0, help="simulated hours of event time")
    parser.add_argument("--window", type=float, default=10.0, help="tumbling window, seconds")
    parser.add_argument("--expires", type=float, default=600.0,
                        help="seconds a window is kept after its end")
    parser.add_argument("--grace", type=float, default=None, help="seconds (default: none)")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct keys of the task")
    parser.add_argument("--keys-per-window", type=int, default=None,
                        help="keys updated in each window, in turn from --keys (default: all)")
    parser.add_argument("--updates-per-key", type=int, default=1,
                        help="records per key and window (the write cache folds them)")
    parser.add_argument("--drain-every", type=int, default=5_000,
                        help="records between drains (each: produce + one LMDB commit)")
    parser.add_argument("--report-minutes", type=float, default=30.0,
                        help="simulated minutes between reports")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="growth allowed after the warm-up (0.05: 5%%)")
    parser.add_argument("--keep", metavar="DIR", help="keep the LMDB store in DIR")
    args = parser.parse_args(argv)
    if args.keys_per_window is None:
        args.keys_per_window = args.keys
    if args.keys_per_window > args.keys:
        parser.error("--keys-per-window must not exceed --keys")

    per_window = args.keys_per_window * args.updates_per_key
    windows = int(round(args.hours * 3600 / args.window))
    print(f"one task, tumbling {args.window:g} s windows, expires {args.expires:g} s, "
          f"{args.keys:,} keys, {args.keys_per_window:,} keys x {args.updates_per_key} "
          f"record(s) per window ({per_window / args.window:,.0f} records per simulated s), "
          f"{args.hours:g} simulated h = {windows * per_window:,} records, drained every "
          f"{args.drain_every:,}", flush=True)
    where = args.keep or tempfile.mkdtemp(prefix="shardsup-windowdisk-")
    try:
        reports = simulate(args, where)
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)
    live = args.keys_per_window * (int(args.expires // args.window) + 1)
    result = verdict(reports, args)
    print(f"expected live entries once warm: about {live:,} "
          f"({args.keys_per_window:,} keys x (expires / window + 1) windows)")
    if result["bounded"] is None:
        print(f"verdict: {result['why']}")
    else:
        g = result["growth"]
        print(f"verdict: {'BOUNDED' if result['bounded'] else 'NOT bounded'} from "
              f"{result['from_hours']:g} h to {result['to_hours']:g} h: data.mdb "
              f"{g['file_bytes']:+.1%}, pages spanned {g['pages_spanned']:+.1%}, entries "
              f"{g['entries']:+.1%}, anonymous RSS (peak) {g['rss_anon']:+.1%} "
              f"(tolerance {args.tolerance:.0%})")
    out = os.path.join(ROOT, "bench-results")
    os.makedirs(out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(out, f"windowdisk-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"workload": "windowdisk",
                   "time": datetime.datetime.now().isoformat(timespec="seconds"),
                   "python": platform.python_version(), "cpus": os.cpu_count(),
                   "settings": vars(args), "expected_live_entries": live,
                   "verdict": result, "reports": reports}, f, indent=1)
    print(f"written: {os.path.relpath(path, ROOT)}")
    return 1 if result["bounded"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
