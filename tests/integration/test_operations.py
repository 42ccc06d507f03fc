"""Operating shardsup: status socket, web endpoints, sd_notify, logs — real processes."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.broker import free_port
from tests.conftest import ROOT, produce
from tests.integration.test_supervision import records, wait_until


def status(datadir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", "status", "--datadir", datadir, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def status_json(datadir: str) -> dict:
    result = status(datadir, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def total_lag(reading: dict) -> int:
    return sum(v for k in reading["children"] for v in k["lag"].values())


def children_counted(reading: dict, above: dict) -> bool:
    """Every child has counted records, more than ``above`` says it had (pid → total)."""
    kids = reading["children"]
    return bool(kids) and all(k["records_total"] > above.get(k["pid"], 0) for k in kids)


def wait_for_status(sup, predicate, timeout: float, what: str) -> dict:
    """Polls ``shardsup status --json`` until ``predicate`` holds; returns that reading."""
    found: dict = {}

    def check() -> bool:
        reading = status_json(sup.datadir)
        if predicate(reading):
            found.update(reading)
            return True
        return False

    sup.wait_for(check, timeout, what)
    return found


def log_roles(logfile) -> set:
    """The roles of the complete JSON lines of ``logfile`` so far (a line being written
    may be cut short: it is skipped until it is whole)."""
    try:
        text = logfile.read_text()
    except FileNotFoundError:
        return set()
    roles = set()
    for line in text.splitlines():
        try:
            roles.add(json.loads(line)["role"])
        except (ValueError, KeyError):
            continue
    return roles


@pytest.mark.timeout(90)
def test_status_over_the_socket_with_real_children(broker, prefix, start_supervisor):
    # 1 ms of work a record: 20,000 records keep both children busy for about 10 s
    sup = start_supervisor("tests.apps.supervised", "-c", "2", env={"SHARDSUP_TEST_WORK_US": "1000"})
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    produce(broker, f"{prefix}-in", records(0, 20_000))
    # two readings, each waited for: every child has counted records while a backlog
    # shows (first), then every child has counted more (second), however fast the machine
    first = wait_for_status(sup, lambda s: children_counted(s, {}) and total_lag(s) > 0,
                            30, "every child counting with a backlog")
    counted = {k["pid"]: k["records_total"] for k in first["children"]}
    second = wait_for_status(sup, lambda s: children_counted(s, counted), 30,
                             "every child to count more records")

    head = second["supervisor"]
    assert head["pid"] == sup.proc.pid and head["app"] == prefix and head["state"] == "running"
    assert head["group"]["state"] == "stable" and isinstance(head["group"]["generation"], int)
    assert head["group"]["member_id"]
    kids = second["children"]
    assert {k["pid"] for k in kids} == set(sup.child_tasks())
    assert sorted(t for k in kids for t in k["tasks"]) == ["0_0", "0_1", "0_2", "0_3"]
    assert sorted(second["tasks"]) == ["0_0", "0_1", "0_2", "0_3"]
    assert {k["pid"] for k in first["children"]} == set(counted) == {k["pid"] for k in kids}
    for reading in (first, second):
        assert all(isinstance(v, int) and v >= 0 for k in reading["children"] for v in k["lag"].values())
    for after in kids:
        assert after["state"] == "running" and after["rss_bytes"] > 10_000_000
        assert after["records_total"] > counted[after["pid"]] > 0, "records do not count up"
        assert after["records_per_s"] > 0 and after["cpu_percent"] is not None
    assert total_lag(first) > 0, "a backlog shows no lag"

    table = status(sup.datadir)
    assert table.returncode == 0
    for kid in kids:
        assert str(kid["pid"]) in table.stdout and ",".join(kid["tasks"]) in table.stdout
    assert sup.stop() == 0
    gone = status(sup.datadir)
    assert gone.returncode != 0 and gone.stderr.count("\n") == 1 and "Traceback" not in gone.stderr


@pytest.mark.timeout(120)
def test_web_status_metrics_and_health_flipping_to_503(broker, prefix, start_supervisor):
    port = free_port()
    sup = start_supervisor("tests.apps.supervised", "-c", "2", "--web-port", str(port),
                           "--max-restarts", "2")
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: get(base + "/health")[0] == 200, 15, "healthy")
    produce(broker, f"{prefix}-in", records(0, 1000))
    code, body = get(base + "/status")
    assert code == 200 and json.loads(body)["supervisor"]["pid"] == sup.proc.pid
    families: dict = {}

    def all_processed() -> bool:  # polled, not slept: any machine speed
        code, text = get(base + "/metrics")
        assert code == 200
        families.update({f.name: f for f in text_string_to_metric_families(text)})
        return sum(s.value for s in families["shardsup_records_processed"].samples) >= 1000

    sup.wait_for(all_processed, 30, "/metrics to count the 1000 records processed")
    processed = families["shardsup_records_processed"].samples
    assert sum(s.value for s in processed) >= 1000
    assert {s.labels["child"] for s in families["shardsup_child_rss_bytes"].samples} == {"0", "1"}
    assert {s.labels["task"] for s in families["shardsup_task_lag"].samples} == {"0_0", "0_1", "0_2", "0_3"}

    produce(broker, f"{prefix}-in", [(b"p", json.dumps({"n": -1, "die": True}).encode(), 0)])
    def failed_health() -> bool:  # 503 already while the crashed child restarts; then failed
        code, body = get(base + "/health")
        return code == 503 and "failed" in json.loads(body)["reason"]

    sup.wait_for(failed_health, 60, "/health to turn 503 with the failed task")
    code, body = get(base + "/health")
    assert code == 503 and "failed: 0_0" in json.loads(body)["reason"]
    assert sup.stop() == 0


@pytest.mark.timeout(30)
def test_web_port_in_use_is_one_line(broker, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "supervisor", "start", "-A", "tests.apps.supervised", "--broker",
             broker, "--datadir", str(tmp_path), "--web-port", str(port)], cwd=ROOT,
            capture_output=True, text=True, timeout=30, env={**__import__("os").environ,
                                                             "SHARDSUP_TEST_PREFIX": "webport"})
    assert result.returncode == 2
    assert f"web port 127.0.0.1:{port} is in use" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_sd_notify_messages_in_order(broker, prefix, start_supervisor, tmp_path):
    import tempfile

    folder = tempfile.mkdtemp(prefix="sdn")  # short path: AF_UNIX paths are limited
    path = f"{folder}/notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(0.2)
    messages = []

    def drain() -> None:
        while True:
            try:
                messages.append(listener.recv(4096).decode())
            except socket.timeout:
                return

    sup = start_supervisor("tests.apps.supervised", "-c", "2",
                           env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    sup.wait_for(lambda: (drain(), any("READY=1" in m for m in messages))[1], 30, "READY=1")
    sup.wait_for(lambda: (drain(), any(m == "WATCHDOG=1" for m in messages))[1], 10, "WATCHDOG=1")
    sup.proc.send_signal(__import__("signal").SIGHUP)
    sup.wait_for(lambda: (drain(), sum("READY=1" in m for m in messages) >= 2)[1], 30, "READY=1 after HUP")
    assert sup.stop() == 0
    drain()
    listener.close()
    kinds = [m.split("\n")[0].split("=")[0] for m in messages if m != "WATCHDOG=1"]
    order = [k for k in kinds if k in ("READY", "RELOADING", "STOPPING")]
    assert order == ["READY", "RELOADING", "READY", "STOPPING"], messages
    assert any(m.startswith("STATUS=") and "children running" in m for m in messages)


@pytest.mark.timeout(90)
def test_json_logs_to_a_file_carry_the_role_of_every_process(broker, prefix, start_supervisor, tmp_path):
    logfile = tmp_path / "shardsup.log"
    sup = start_supervisor("tests.apps.supervised", "-c", "2", "--logfile", str(logfile),
                           "--log-format", "json")
    sup.wait_for(lambda: len(sup.child_tasks()) == 2, 30, "two children")
    produce(broker, f"{prefix}-in", records(0, 100))
    sup.wait_for(lambda: any(r.startswith("child 0_") for r in log_roles(logfile)), 30,
                 "a JSON log line of a child")
    assert sup.stop() == 0
    lines = logfile.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    roles = {e["role"] for e in entries}
    assert "supervisor" in roles
    assert any(r.startswith("child 0_") for r in roles), roles
    assert all({"ts", "level", "msg", "pid"} <= set(e) for e in entries)
