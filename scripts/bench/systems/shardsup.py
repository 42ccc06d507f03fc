"""shardsup as the benchmark starts it: ``shardsup start -A <app> -c N`` (the supervisor and
its children) with ``scripts/`` as the current directory, and ``shardsup table`` to read a
table back from LMDB.  The apps are ``scripts/bench_app.py`` (stateless) and
``scripts/bench_state_app.py`` (stateful); their topics come from the environment
(BENCH_PREFIX, BENCH_PARTITIONS, ...)."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Dict, List

from ..measure import SCRIPTS


def start_command(app: str, bootstrap: str, datadir: str, concurrency: int, loglevel: str,
                  json_logs: bool = False) -> List[str]:
    cmd = [sys.executable, "-m", "supervisor", "start", "-A", app, "--broker", bootstrap,
           "--datadir", datadir, "-c", str(concurrency), "-l", loglevel]
    if json_logs:
        cmd += ["--log-format", "json"]
    return cmd


def read_table(app: str, datadir: str, name: str, env: Dict[str, str]) -> Dict[str, Any]:
    """``shardsup table -A APP --datadir D NAME``: the table from LMDB."""
    out = subprocess.run([sys.executable, "-m", "supervisor", "table", "-A", app,
                          "--datadir", datadir, name], cwd=SCRIPTS, env=env,
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"shardsup table {name} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)
