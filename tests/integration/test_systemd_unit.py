"""The systemd unit passes ``systemd-analyze verify`` (moved from tests/unit/test_ops_units.py:
it runs an outside program)."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest

from tests.conftest import ROOT

UNIT = os.path.join(ROOT, "systemd", "shardsup@.service")


UNIT_BINARY = "/opt/shardsup/venv/bin/shardsup"


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        reason = ("systemd-analyze not found (Debian/Ubuntu: apt-get install systemd); "
                  "cannot verify systemd/shardsup@.service")
        print(reason)
        pytest.skip(reason)
    return found


def _verify(analyze: str, unit: str) -> subprocess.CompletedProcess:
    return subprocess.run([analyze, "verify", "--man=no", unit], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})


@pytest.mark.timeout(90)
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Any) -> None:
    """``verify`` needs an instance of the template, and checks that ExecStart's binary
    exists.  On a machine without /opt/shardsup the one complaint must be exactly that;
    with the path pointed at a stand-in executable (the only change) it must pass."""
    analyze = _systemd_analyze()
    text = open(UNIT).read()
    assert f"ExecStart={UNIT_BINARY} start -A %i --datadir ${{STATE_DIRECTORY}} $SHARDSUP_OPTS" in text
    for line in ("Type=notify", "NotifyAccess=main", "KillMode=mixed", "KillSignal=SIGTERM",
                 "TimeoutStopSec=45", "Restart=on-failure", "WatchdogSec=30", "User=shardsup",
                 "StateDirectory=shardsup/%i", "EnvironmentFile=-/etc/shardsup/%i.env",
                 "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
        assert f"\n{line}\n" in text, line

    as_is = tmp_path / "as-is" / "shardsup@proj.service"
    as_is.parent.mkdir()
    as_is.write_text(text)
    result = _verify(analyze, str(as_is))
    if not os.path.exists(UNIT_BINARY):
        complaints = [l for l in (result.stdout + result.stderr).splitlines() if l.strip()]
        assert complaints == [f"shardsup@proj.service: Command {UNIT_BINARY} is not executable: "
                              "No such file or directory"], complaints

    stand_in = tmp_path / "bin" / "shardsup"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    instance = tmp_path / "unit" / "shardsup@proj.service"
    instance.parent.mkdir()
    instance.write_text(text.replace(UNIT_BINARY, str(stand_in)))
    result = _verify(analyze, str(instance))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", output
