"""The benchmark's command line and run loop: starts the embedded broker, runs each named
run (``--runs``, or the runs of ``--workload``, plus ``--peers``), prints each run's line and
the report, writes the JSON and the plot.  See docs/benchmark.md."""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from . import plot
from .measure import ROOT, calibrate, code_state, fmt, is_state_kind, state_truth
from .results import comparison, print_comparison, summarize, summarize_state, write_json
from .systems import peers
from .systems.raw import raw_child, state_raw_child
from .work import LINGER_ENV
from .workloads.kill import KillRun
from .workloads.restore import RestoreRun
from .workloads.stateful import StateRun, print_profiles
from .workloads.stateless import Run
from .workloads.twostage import TwoStageRun


STATELESS_RUNS = "raw,c1,c2"
STATEFUL_RUNS = ("state-raw,state-c1,state-c2,twostage-c1,twostage-c2,state-eos-c1,state-eos-c2,"
                 "state-restore,state-kill")
#: the one-stage count beside the two-stage one (re-key, then count), -c 1 and -c 2
TWOSTAGE_RUNS = "state-c1,twostage-c1,state-c2,twostage-c2"
PEER_NAMES = "|".join(peers.PEERS)
RUN_NAME = re.compile(r"^(raw|c[1-9][0-9]*|state-raw|state-c[1-9][0-9]*|state-eos-c[1-9][0-9]*"
                      r"|twostage-c[1-9][0-9]*"
                      rf"|state-restore|state-kill|(state-)?({PEER_NAMES}))$")


def make_run(kind: str, args: argparse.Namespace, broker: Any, iters: int, workdir: str,
             truth: Tuple[Dict[str, int], Dict[str, int]], peer_python: str) -> Any:
    """The run object of one run name (its module: workloads/ or systems/peers.py)."""
    pid = broker.proc.pid
    if kind in peers.PEERS:
        return peers.PeerRun(kind, args, broker.bootstrap, pid, iters, workdir, peer_python)
    if kind.startswith("state-") and kind[6:] in peers.PEERS:
        return peers.PeerStateRun(kind, args, broker.bootstrap, pid, workdir, truth, peer_python)
    if kind == "state-restore":
        return RestoreRun(kind, args, broker.bootstrap, pid, workdir, truth)
    if kind == "state-kill":
        return KillRun(kind, args, broker.bootstrap, pid, workdir, truth)
    if kind.startswith("twostage-"):
        return TwoStageRun(kind, args, broker.bootstrap, pid, workdir)
    if is_state_kind(kind):
        return StateRun(kind, args, broker.bootstrap, pid, workdir, truth)
    return Run(kind, args, broker.bootstrap, pid, iters, workdir)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="End-to-end throughput of shardsup against a raw confluent-kafka loop "
                    "doing the same work, and against other stream processors, in one run.",
        epilog="docs/benchmark.md describes the workloads, the systems and the columns.")
    parser.add_argument("--records", type=int, default=300_000, help="input records per run")
    parser.add_argument("--workload", choices=["stateless", "stateful", "twostage", "all"],
                        default="all",
                        help=f"which runs --runs defaults to: stateless ({STATELESS_RUNS}), "
                             f"stateful ({STATEFUL_RUNS}), twostage ({TWOSTAGE_RUNS}: the "
                             "one-stage and the two-stage count only) or all (stateless and "
                             "stateful; the default)")
    parser.add_argument("--runs", default=None,
                        help="comma-separated run names (overrides --workload): raw, cN "
                             "(stateless, shardsup -c N), state-raw, state-cN, state-eos-cN, "
                             "twostage-cN (re-key with group_by, then count and sum), "
                             "state-restore, state-kill; peers: quix, faust, bytewax, "
                             "pathway (stateless) and state-<peer> (count and sum per key)")
    parser.add_argument("--peers", nargs="?", const=",".join(peers.PEERS), default="",
                        help="add the peers' runs to each workload measured (all, or a "
                             f"comma-separated subset of {','.join(peers.PEERS)}); their "
                             f"virtualenv {os.path.relpath(peers.VENV, ROOT)} is created on "
                             "first use (pip install)")
    parser.add_argument("--no-plot", dest="plot", action="store_false",
                        help="skip the PNG (bench-results/<timestamp>.png)")
    parser.add_argument("--partitions", type=int, default=8, help="partitions of every topic")
    parser.add_argument("--work-us", type=float, default=20.0,
                        help="µs of work per record (stateless runs)")
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys (stateful runs)")
    parser.add_argument("--no-restore", dest="restore", action="store_false",
                        help="skip the end-to-end restore measured after each state-c1 run")
    parser.add_argument("--restore-records", type=int, default=1_000_000,
                        help="changelog records of the synthetic restore (state-restore)")
    parser.add_argument("--kill-keys", type=int, default=100_000,
                        help="keys in the tables when state-kill kills the child")
    parser.add_argument("--kill-extra", type=int, default=200_000,
                        help="records state-kill produces to keep the child busy at the kill")
    parser.add_argument("--profile", action="store_true",
                        help="run the state-cN children under cProfile and print their top "
                             "functions (slows them: not for the figures)")
    parser.add_argument("--repeat", type=int, default=1, help="run each kind this often (medians)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one run may take to deliver every record")
    parser.add_argument("--stop-timeout", type=float, default=60.0,
                        help="seconds a stopped process may take to exit before it is killed")
    parser.add_argument("--keep", action="store_true", help="keep the logs' temporary directory")
    parser.add_argument("--loglevel", default="warning",
                        help="shardsup's -l for the cN and state-cN runs (their logs go to the "
                             "temporary directory; see --keep)")
    parser.add_argument("--linger-ms", type=int, default=None,
                        help="producer_linger_ms of shardsup's benchmark apps and linger.ms of "
                             "the raw loop's producer (default: the App's, 50)")
    # internal: the raw loops' processes
    parser.add_argument("--raw-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state-raw-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.linger_ms is not None:  # read by the apps and the raw loop's process at import
        os.environ[LINGER_ENV] = str(args.linger_ms)
    if args.raw_child:
        return raw_child(args)
    if args.state_raw_child:
        return state_raw_child(args)

    if args.runs is None:
        args.runs = {"stateless": STATELESS_RUNS, "stateful": STATEFUL_RUNS,
                     "twostage": TWOSTAGE_RUNS,
                     "all": f"{STATELESS_RUNS},{STATEFUL_RUNS}"}[args.workload]
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    chosen = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in chosen:
        if p not in peers.PEERS:
            parser.error(f"unknown peer {p!r}: use {', '.join(peers.PEERS)}")
    # the peers of each workload measured, after its own runs
    if any(not is_state_kind(r) for r in args.runs):
        args.runs += [p for p in chosen if p not in args.runs]
    if any(is_state_kind(r) and r not in ("state-restore", "state-kill") for r in args.runs) \
            or (chosen and args.workload == "stateful"):
        args.runs += [f"state-{p}" for p in chosen if f"state-{p}" not in args.runs]
    for r in args.runs:
        if not RUN_NAME.match(r):
            parser.error(f"unknown run {r!r}: use raw, cN, state-raw, state-cN, state-eos-cN, "
                         "twostage-cN, state-restore, state-kill, a peer or state-<peer>")
    if len(set(args.runs)) != len(args.runs):
        parser.error("a run is named twice in --runs")
    if args.records < 1 or args.partitions < 1 or args.repeat < 1 or args.keys < 1 \
            or args.restore_records < 1:
        parser.error("--records, --partitions, --repeat, --keys and --restore-records must be "
                     "positive")
    stateless = [r for r in args.runs if not is_state_kind(r)]
    stateful = [r for r in args.runs if is_state_kind(r)]

    import confluent_kafka

    from supervisor.broker import EmbeddedBroker

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally blocks that stop our processes

    signal.signal(signal.SIGTERM, on_term)
    print(f"shardsup benchmark: python {platform.python_version()}, confluent-kafka "
          f"{confluent_kafka.version()} (librdkafka {confluent_kafka.libversion()[0]}), "
          f"{os.cpu_count()} CPUs; runs: {', '.join(args.runs)}")
    print(f"code: {code_state()}")
    wanted = sorted({peers.peer_of(k) for k in args.runs} - {None}, key=peers.PEERS.index)
    peer_python, unavailable = "", {}
    if wanted:
        peer_python, unavailable = peers.ensure_venv(wanted)
        for p in wanted:
            print(f"peer {p}: " + (f"unavailable: {unavailable[p]}" if p in unavailable
                                   else peers.describe(peer_python, p)), flush=True)
    cal = {"iters": 0, "us": float("nan")}
    if stateless:
        cal = calibrate(args.work_us)
        print(f"work: {cal['iters']} iterations of bench.work.work = {cal['us']:.1f} µs/record "
              f"measured (target {args.work_us:.0f})")
    truth = state_truth(args.records, args.keys) if stateful else ({}, {})
    workdir = tempfile.mkdtemp(prefix="shardsup-bench-")
    broker = EmbeddedBroker()
    results: Dict[str, List[Dict[str, Any]]] = {}
    meta: Dict[str, Any] = {"code": code_state(), "work": cal, "peers_unavailable": {}}
    interrupted = False
    try:
        try:
            broker.start()
        except Exception as exc:  # noqa: BLE001 - one line, exit code 2
            print(f"bench: cannot start the embedded broker: {exc}", file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
            return 2
        assert broker.proc is not None
        print(f"broker: tansu on {broker.bootstrap} (in memory); logs in {workdir}")
        load = meta["load"] = os.getloadavg()[0]
        if load > 0.5:
            print(f"warning: load average {load:.2f} before the runs: other processes are "
                  f"busy on this machine, expect noisy numbers")
        for rep in range(args.repeat):
            # repeats rotate the order, so no kind always runs first (or on a fuller broker)
            shift = rep % len(args.runs)
            for kind in args.runs[shift:] + args.runs[:shift]:
                t0 = time.monotonic()
                try:
                    if peers.peer_of(kind) in unavailable:
                        res = {"run": kind, "ok": False, "note": "",
                               "unavailable": unavailable[peers.peer_of(kind)]}
                    else:
                        res = make_run(kind, args, broker, int(cal["iters"]), workdir, truth,
                                       peer_python).execute()
                except Exception as exc:  # noqa: BLE001 - report it, go on with the next run
                    res = {"run": kind, "ok": False, "note": f"{type(exc).__name__}: {exc}"}
                results.setdefault(kind, []).append(res)
                failed = '' if res.get('ok') else '  FAILED'
                if res.get("unavailable"):
                    print(f"  {kind:<13} #{rep + 1}: unavailable: {res['unavailable']}",
                          flush=True)
                    continue
                if kind == "state-kill":
                    print(f"  {kind:<13} #{rep + 1}: kill -9 → next record "
                          f"{fmt(res.get('kill_resume_s'), '.2f')} s with LMDB kept "
                          f"({fmt(res.get('kill_resume_restored'), ',.0f')} records restored; "
                          f"tasks whose state was ahead of the group's offset and read on from "
                          f"it: {res.get('kill_resume_ahead', '-')}, exactly at it: "
                          f"{res.get('kill_resume_at_offset', '-')}), "
                          f"{fmt(res.get('kill_wiped_s'), '.2f')} s with the stores deleted "
                          f"({fmt(res.get('kill_wiped_restored'), ',.0f')} restored), exact "
                          f"{'yes' if res.get('exact') else 'NO'}, "
                          f"run {time.monotonic() - t0:.1f} s{failed}", flush=True)
                elif kind == "state-restore":
                    print(f"  {kind:<13} #{rep + 1}: {fmt(res.get('restore_records'), ',.0f')} "
                          f"changelog records restored in {fmt(res.get('restore_s'), '.2f')} s = "
                          f"{fmt(res.get('restore_rate'), ',.0f')} rec/s (e2e), apply_changelog "
                          f"alone {fmt(res.get('unit_rate'), ',.0f')} rec/s, broker cpu "
                          f"{fmt(res.get('broker_cpu_s'), '.1f')} s and supervisor+child cpu "
                          f"{fmt(res.get('cpu_s'), '.1f')} s during the e2e restore (incl. "
                          f"start-up), changelog produced "
                          f"in {fmt(res.get('produce_s'), '.1f')} s, "
                          f"run {time.monotonic() - t0:.1f} s{failed}", flush=True)
                elif is_state_kind(kind):
                    restore = ""
                    if res.get("restore_tasks") is not None:
                        restore = (f", restore {fmt(res.get('restore_records'), ',.0f')} records "
                                   f"of {res.get('restore_tasks')} tasks in "
                                   f"{fmt(res.get('restore_s'), '.2f')} s = "
                                   f"{fmt(res.get('restore_rate'), ',.0f')} rec/s")
                    print(f"  {kind:<13} #{rep + 1}: {fmt(res.get('rate'), ',.0f')} rec/s steady "
                          f"(mid80 {fmt(res.get('mid_rate'), ',.0f')}"
                          + (f", commit-sampled {fmt(res.get('commit_rate'), ',.0f')}"
                             if kind != "state-raw" else "")
                          + (f", from stage 1's first forward "
                             f"{fmt(res.get('from_forward_rate'), ',.0f')}"
                             if kind.startswith("twostage-") else "")
                          + f"), startup {fmt(res.get('startup_s'), '.2f')} s, "
                          f"{res.get('received', 0):,}/{args.records:,} records, "
                          f"longest pause {fmt(res.get('pause_s'), '.2f')} s after "
                          f"{res.get('pause_at', 0):,} records, "
                          + (f"{fmt(res.get('changelog_records'), ',.0f')} changelog records, "
                             if kind != "state-raw" else "")
                          + f"exact {'yes' if res.get('exact') else 'NO'}{restore}, "
                          f"pre-produce {fmt(res.get('produce_s'), '.1f')} s, "
                          f"run {time.monotonic() - t0:.1f} s{failed}", flush=True)
                    if res.get("profiles"):
                        print_profiles(kind, res["profiles"])
                else:
                    print(f"  {kind:<4} #{rep + 1}: {fmt(res.get('rate'), ',.0f')} rec/s steady, "
                          f"startup {fmt(res.get('startup_s'), '.2f')} s, "
                          f"{res.get('received', 0):,}/{args.records:,} records, "
                          f"longest pause {fmt(res.get('pause_s'), '.2f')} s after "
                          f"{res.get('pause_at', 0):,} results, "
                          f"pre-produce {fmt(res.get('produce_s'), '.1f')} s, "
                          f"run {time.monotonic() - t0:.1f} s{failed}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        interrupted = True
    finally:
        broker.stop()
    ok = not interrupted
    if stateless:
        sub = argparse.Namespace(**{**vars(args), "runs": stateless})
        ok = summarize({k: v for k, v in results.items() if not is_state_kind(k)}, sub, cal) and ok
    if stateful:
        ok = summarize_state({k: v for k, v in results.items() if is_state_kind(k)}, args) and ok
    rows = comparison(results, args)
    print_comparison(rows, args)
    meta["peers_unavailable"] = unavailable
    path = write_json(results, args, meta, rows)
    print(f"\nresults as JSON: {os.path.relpath(path, os.getcwd())}")
    if args.plot:
        print(plot.plot(rows, args, path[:-len(".json")] + ".png", peer_python))
    if not args.keep and ok and not args.profile:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
