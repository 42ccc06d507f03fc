"""Entry point of a child process: ``python -m shardworker.child``.

The supervisor starts it by fork+exec, so nothing of the supervisor's Kafka clients,
threads or sockets exists here except the one control socket it passes by number.
"""
from __future__ import annotations

import argparse
import ctypes
import faulthandler
import gc
import logging
import os
import signal
import socket
import sys
from typing import List, Optional, TextIO

from confluent_kafka import KafkaError, KafkaException

from .logs import open_private, setup_logging
from .broker_wait import BrokerUnavailable, broker_unreachable
from .protocol import EXIT_BROKER_UNAVAILABLE, Channel, Failed

PR_SET_PDEATHSIG = 1
#: net container allocations between two collections of the young generation in a child
#: (CPython's default: 700)
GC_YOUNG_THRESHOLD = 10_000


def die_with_parent() -> None:
    """Asks the kernel to KILL this process when the supervisor dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def tune_gc() -> None:
    """Keeps the cyclic garbage collector's scans off the record path: what start-up made
    (modules, the app) is frozen out of them, and the young generation is scanned every
    :data:`GC_YOUNG_THRESHOLD` net allocations instead of 700 (a batch of 1,000 records
    queues a few thousand containers for its agents, which reference counting frees).
    Start-up's garbage is collected first.  An app that set a higher threshold, or none
    (0: no automatic collection), keeps it.  Measured: docs/benchmark.md, "The record
    path in one process"."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if young:
        gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


def open_trace(path: Optional[str]) -> TextIO:
    """The file USR1 writes tracebacks to: private, appended to, never through a link
    (the supervisor removed any; one planted since makes us fall back to stderr)."""
    if path:
        try:
            return os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "a")
        except OSError as exc:
            sys.stderr.write(f"cannot open trace file {path}: {exc}; tracebacks go to stderr\n")
    return sys.stderr


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="shardworker.child")
    parser.add_argument("--app", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--datadir", default=".")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--trace-file", default=None,
                        help="where USR1 writes this process's tracebacks (the supervisor reads it)")
    args = parser.parse_args(argv)

    die_with_parent()
    if os.getppid() != args.parent:  # the supervisor died before prctl took effect
        return 1
    # Ctrl-C reaches the whole foreground process group; the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # USR1 dumps every thread's traceback from the signal handler itself, so it works even
    # while an agent is stuck in a long C call; the supervisor gathers the file's new lines.
    trace_file = open_trace(args.trace_file)
    faulthandler.register(signal.SIGUSR1, file=trace_file, all_threads=True)
    setup_logging(f"child {args.index}", args.loglevel, args.log_format)
    os.environ["SHARDSUP_BROKER"] = args.broker

    channel = Channel(socket.socket(fileno=args.fd))
    from .loader import load_app
    from .worker import Worker

    try:
        app = load_app(args.app)
        tune_gc()
        return Worker(app, channel, args.broker, args.index, args.datadir).run()
    except Exception as exc:  # noqa: BLE001 - report why, exit non-zero, get restarted
        return report_failure(channel, exc)


def report_failure(channel: Channel, exc: Exception) -> int:
    """Tells the supervisor why this child stops and returns the exit code: the broker
    being unreachable is not a crash of the agent's code (DESIGN.md, "Processes"), so it
    exits with :data:`EXIT_BROKER_UNAVAILABLE`, which the supervisor does not count."""
    log = logging.getLogger("shardworker.child")
    unavailable = isinstance(exc, BrokerUnavailable) or (
        isinstance(exc, KafkaException) and isinstance(exc.args[0], KafkaError)
        and broker_unreachable(exc.args[0]))
    if unavailable:
        log.warning("the broker is unreachable (%s); exiting to be restarted, the batch "
                    "will be read again", exc)
    else:
        log.exception("child failed: %s", exc)
    try:
        channel.send(Failed(f"{type(exc).__name__}: {exc}", broker_unavailable=unavailable))
    except Exception:  # noqa: BLE001 - the supervisor may be gone
        pass
    return EXIT_BROKER_UNAVAILABLE if unavailable else 3


if __name__ == "__main__":
    sys.exit(main())
