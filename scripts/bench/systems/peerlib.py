"""What every peer's process shares (standard library only: it runs in the peers'
virtualenv): its command line and :class:`Progress`, which counts the records processed,
keeps the peer's own clock (first record → last record), the final state of each key
(stateful) and writes them to BENCH_STATS_DIR (``stats-<pid>.json``) when the N-th record
is done; the benchmark polls for that file."""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from ..work import write_stats


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", choices=["stateless", "stateful"], required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True, help="topics <prefix>-in, <prefix>-out")
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--workdir", required=True, help="the peer's own files (its state)")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    return args


class Progress:
    """Counts processed records; at N writes the stats file once and returns True."""

    def __init__(self, n: int, keys: int) -> None:
        self.n = n
        self.seen = 0
        self.first: Optional[float] = None
        self.points: List[Tuple[float, int]] = []
        #: the state of each key after its last record (n ≥ N − keys: every key's last one)
        self.last_from = n - keys
        self.final: Dict[str, List[int]] = {}
        self.done = False

    def record(self, number: int = -1, key: str = "", count: int = 0, total: int = 0) -> bool:
        if self.first is None:
            self.first = time.time()
        self.seen += 1
        if number >= self.last_from:
            self.final[key] = [count, total]
        if self.seen % 1000 == 0:
            self.points.append((time.time(), self.seen))
        if self.seen >= self.n and not self.done:
            self.finish()
            return True
        return False

    def finish(self, extra: Optional[Dict[str, Any]] = None) -> None:
        self.done = True
        last = time.time()
        if not self.points or self.points[-1][1] != self.seen:
            self.points.append((last, self.seen))
        write_stats({"seen": self.seen, "first": self.first or last, "last": last,
                     "points": self.points, "final": self.final, **(extra or {})})
