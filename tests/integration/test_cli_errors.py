"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from supervisor.broker import free_port
from tests.conftest import ROOT


def shardsup(*args: str, timeout: float = 30, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=ROOT, timeout=timeout,
                          capture_output=True, text=True,
                          env={**os.environ, "SHARDSUP_TEST_PREFIX": "cli", **(env or {})})


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%" not in line[:2]]
    errors = [line for line in lines if line.startswith("shardsup: error:") or line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.mark.timeout(30)
def test_unknown_module(tmp_path):
    line = one_line_error(shardsup("start", "-A", "no_such_module_xyz", "--datadir", str(tmp_path)))
    assert "no_such_module_xyz" in line and "no such module" in line


@pytest.mark.timeout(30)
def test_module_without_app(tmp_path):
    line = one_line_error(shardsup("start", "-A", "tests.apps.no_app", "--datadir", str(tmp_path)))
    assert "defines no shardworker.App" in line


@pytest.mark.timeout(30)
def test_attribute_that_is_not_an_app(tmp_path):
    line = one_line_error(shardsup("start", "-A", "tests.apps.no_app:VALUE", "--datadir", str(tmp_path)))
    assert "is not a shardworker.App" in line


@pytest.mark.timeout(40)
def test_unreachable_broker_is_named_within_bounded_time(tmp_path):
    port = free_port()  # nothing listens there
    began = time.monotonic()
    result = shardsup("start", "-A", "tests.apps.doubler", "--broker", f"kafka://127.0.0.1:{port}",
                      "--datadir", str(tmp_path))
    line = one_line_error(result)
    assert f"127.0.0.1:{port}" in line and "cannot reach" in line
    assert time.monotonic() - began < 25


@pytest.mark.timeout(30)
def test_bad_option():
    result = shardsup("start", "-A", "tests.apps.doubler", "-c", "0")
    assert result.returncode == 2
    assert "-c" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_busy_datadir_names_the_running_pid(tmp_path, broker, start_supervisor):
    sup = start_supervisor("tests.apps.doubler", "-c", "1", name="busy")
    datadir = tmp_path / "busy"
    sup.wait_for(lambda: (datadir / "supervisor.pid").exists() and
                 (datadir / "supervisor.pid").read_text().strip() != "", 20, "the pid file")
    line = one_line_error(shardsup("start", "-A", "tests.apps.doubler", "--broker", broker,
                                   "--datadir", str(datadir)))
    assert "in use" in line and str(sup.proc.pid) in line
    assert sup.stop() == 0


@pytest.mark.timeout(30)
def test_partition_mismatch_is_reported(tmp_path, broker, prefix):
    from tests.conftest import create_topic

    create_topic(broker, f"{prefix}-in", 2)  # the app declares 4
    result = shardsup("start", "-A", "tests.apps.doubler", "--broker", broker, "--datadir",
                      str(tmp_path), env={"SHARDSUP_TEST_PREFIX": prefix})
    line = one_line_error(result)
    assert f"{prefix}-in" in line and "2 partitions" in line and "declares 4" in line


@pytest.mark.timeout(30)
def test_version_and_help():
    assert shardsup("--version").stdout.startswith("shardsup, version")
    for command in ("start", "send"):
        result = shardsup(command, "--help")
        assert result.returncode == 0 and "-A" in result.stdout


@pytest.mark.timeout(60)
def test_send_encodes_with_the_topic_serializers(broker, prefix):
    from tests.conftest import read_topic

    result = shardsup("send", "-A", "tests.apps.doubler", "--broker", broker, f"{prefix}-in",
                      "--key", "u1", '{"n": 3}', env={"SHARDSUP_TEST_PREFIX": prefix})
    assert result.returncode == 0, result.stderr
    (msg,) = read_topic(broker, f"{prefix}-in", 1, timeout=20)
    assert (msg.key(), msg.value()) == (b"u1", b'{"n":3}')
    bad = shardsup("send", "-A", "tests.apps.doubler", "--broker", broker, f"{prefix}-in", "{oops",
                   env={"SHARDSUP_TEST_PREFIX": prefix})
    assert "not valid JSON" in one_line_error(bad)
    # a partition the topic does not have: the broker refuses, and send says so
    refused = shardsup("send", "-A", "tests.apps.doubler", "--broker", broker, f"{prefix}-in",
                       "--partition", "9", '{"n": 4}', env={"SHARDSUP_TEST_PREFIX": prefix})
    assert "send failed" in one_line_error(refused)
