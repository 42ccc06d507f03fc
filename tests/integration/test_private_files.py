"""Private files (issue 11, point 11): whatever the umask of the shell, the datadir and
everything in it is the user's alone; the pid file, dumps and traces never write through
a symbolic link planted in their place (that text inside a log record cannot forge a
line is tests/unit/test_log_lines.py)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from typing import Dict, List

import pytest

from tests.conftest import ROOT, produce, read_topic


def modes_under(folder: str) -> Dict[str, int]:
    """Path → permission bits of the folder and of everything under it."""
    found = {folder: stat.S_IMODE(os.lstat(folder).st_mode)}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            found[path] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def shardsup(*args: str, env: Dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
def test_everything_under_the_datadir_is_private_under_umask_022(
        broker, prefix, start_supervisor, tmp_path):
    logfile = str(tmp_path / "shardsup.log")
    old = os.umask(0o022)  # as from a login shell; the supervisor inherits it
    try:
        sup = start_supervisor("tests.apps.counter", "-c", "2", "--logfile", logfile)
    finally:
        os.umask(old)
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    produce(broker, f"{prefix}-in", [(f"u{n}".encode(), json.dumps({"n": n, "amount": 1}).encode(), n % 4)
                                     for n in range(40)])
    assert len(read_topic(broker, f"{prefix}-out", 40, timeout=60)) >= 40
    env = {**os.environ, "SHARDSUP_TEST_PREFIX": prefix}
    dumped = shardsup("dump", "--datadir", sup.datadir, env=env)
    assert dumped.returncode == 0, dumped.stderr

    modes = modes_under(sup.datadir)
    kinds = {os.path.basename(p) for p in modes}
    assert {"supervisor.pid", "supervisor.sock", "dump-latest.txt", "child-0.trace"} <= kinds
    assert any(name.endswith(".mdb") for name in kinds), f"no LMDB file among {sorted(kinds)}"
    shared = {p: oct(m) for p, m in modes.items() if m & 0o077}
    assert not shared, f"open to group or others: {shared}"
    assert stat.S_IMODE(os.stat(logfile).st_mode) == 0o600
    assert sup.stop() == 0


def test_a_symlink_planted_as_the_pid_file_is_refused_and_not_followed(broker, prefix, tmp_path):
    datadir = tmp_path / "data"
    datadir.mkdir(mode=0o700)
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    os.symlink(precious, datadir / "supervisor.pid")
    env = {**os.environ, "SHARDSUP_TEST_PREFIX": prefix}
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "start", "-A", "tests.apps.failing",
                             "--broker", broker, "--datadir", str(datadir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert precious.read_text() == "keep me\n"
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if line.startswith("shardsup: error:")]
    assert lines == [f"shardsup: error: {datadir}/supervisor.pid is a symbolic link; refusing "
                     "to follow it (remove it, or choose another datadir)"], err
    assert os.path.islink(datadir / "supervisor.pid"), "the planted link was not left for the operator"


@pytest.mark.timeout(90)
def test_dump_and_trace_files_replace_a_planted_symlink_instead_of_following_it(
        broker, prefix, start_supervisor, tmp_path):
    datadir = tmp_path / "a"
    (datadir / "traces").mkdir(parents=True, mode=0o700)
    datadir.chmod(0o700)
    planted: List[str] = ["dump-latest.txt", "dump-latest.txt.tmp", "traces/child-0.trace"]
    outside = {}
    for n, name in enumerate(planted):
        target = tmp_path / f"outside-{n}"
        target.write_text(f"outside {n}\n")
        os.symlink(target, datadir / name)
        outside[target] = f"outside {n}\n"
    sup = start_supervisor("tests.apps.failing", "-c", "1", name="a")
    sup.wait_for(lambda: len(sup.child_tasks()) == 1, 30, "one child")
    dumped = shardsup("dump", "--datadir", sup.datadir,
                      env={**os.environ, "SHARDSUP_TEST_PREFIX": prefix})
    assert dumped.returncode == 0, dumped.stderr
    assert "== child 0" in dumped.stdout
    for target, text in outside.items():
        assert target.read_text() == text, f"{target} was written through a link"
    for name in ("dump-latest.txt", "traces/child-0.trace"):
        path = datadir / name
        assert not os.path.islink(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o600, name
    assert "Thread" in (datadir / "dump-latest.txt").read_text()
    assert sup.stop() == 0
