"""The quick start's demo (issue 15, point 6): ``./scripts/demo.sh`` prints the commands
to run in a second terminal, and they work as printed while it runs."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import ROOT

DATADIR = os.path.join(ROOT, "orders-demo-data")  # the demo's default: ./<app id>-data


@pytest.mark.timeout(150)
def test_the_demo_prints_commands_that_work_as_printed(tmp_path):
    if os.path.exists(os.path.join(DATADIR, "supervisor.sock")):
        pytest.skip("a demo is running in this checkout")
    shutil.rmtree(DATADIR, ignore_errors=True)
    log_path = tmp_path / "demo.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(["bash", os.path.join("scripts", "demo.sh")], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 100
        text = ""
        while time.monotonic() < deadline and text.count("spent=") < 10:
            assert proc.poll() is None, text[-3000:]
            time.sleep(0.5)
            text = log_path.read_text(errors="replace")
        assert text.count("spent=") >= 10, text[-3000:]
        commands = [line.strip() for line in text.splitlines()
                    if line.strip().startswith(".venv/bin/shardsup ")]
        assert len(commands) == 3, text[:2000]
        outputs = {}
        for command in commands:
            result = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True,
                                    text=True, timeout=60)
            assert result.returncode == 0, (command, result.stderr)
            outputs[command.split()[-1]] = result.stdout
        status = outputs["examples.orders"]
        assert "sub-topology 1: orders-demo-by-user-repartition (repartition)" in status
        assert "tables spent, counted, per_minute" in status
        spent = json.loads(outputs["spent"])
        assert spent and all(k.startswith("u") and v > 0 for k, v in spent.items())
        windows = json.loads(outputs["per_minute"])
        assert windows and all(isinstance(v, dict) for v in windows.values())
        # each line of the demo names the child that printed it
        assert "[child 0_" in text and " pid " in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(DATADIR, ignore_errors=True)
