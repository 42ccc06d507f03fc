"""Operating shardsup as a service: the control socket, the web endpoint and sd_notify,
each exercised for real (Unix sockets, HTTP on loopback, datagrams), without a broker.
The systemd unit (``systemd-analyze verify``) is tests/integration/test_systemd_unit.py."""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from supervisor import sdnotify
from supervisor.errors import UsageError
from supervisor.status import MAX_REQUEST, StatusServer, format_status, query
from supervisor.web import WebServer, health, render_metrics

NOBODY = 65534

SAMPLE: Dict[str, Any] = {
    "supervisor": {
        "pid": 4242, "app": "proj", "broker": "localhost:9092", "datadir": "/var/lib/shardsup/proj",
        "uptime_s": 3725.5, "state": "running",
        "group": {"state": "stable", "generation": 7, "member_id": "rdkafka-1234-abcd", "rebalances": 3},
    },
    "children": [
        {"index": 0, "pid": 5001, "tasks": ["0_0", "0_2"], "state": "running", "uptime_s": 3600.0,
         "restarts": 0, "records_per_s": 1523.25, "records_total": 987654, "errors_total": 2,
         "lag": {"0_0": 10, "0_2": 5}, "rss_bytes": 52428800, "cpu_percent": 37.5, "last_error": None},
        {"index": 1, "pid": 5002, "tasks": ["0_1", "0_3"], "state": "restoring", "uptime_s": 12.0,
         "restarts": 4, "records_per_s": 0.0, "records_total": 0, "errors_total": 0,
         "lag": {"0_1": None, "0_3": 7}, "rss_bytes": None, "cpu_percent": None,
         "last_error": "ZeroDivisionError: division by zero\n  in agent process " + "x" * 200},
    ],
    "tasks": {
        "0_0": {"child": 0, "state": "running", "lag": 10},
        "0_1": {"child": 1, "state": "restoring", "lag": None},
        "0_2": {"child": 0, "state": "running", "lag": 5},
        "0_3": {"child": 1, "state": "restoring", "lag": 7},
    },
    # supervisor.metricstore.families: merged over the children
    "metrics": [
        {"name": "shardsup_records_processed", "kind": "counter", "doc": "Records processed.",
         "labels": ["task", "topic", "partition"], "series": [
             {"labels": {"task": "0_0", "topic": "in", "partition": "0"}, "value": 600000},
             {"labels": {"task": "0_2", "topic": "in", "partition": "2"}, "value": 387654}]},
        {"name": "orders_seen", "kind": "counter", "doc": "Orders seen.", "labels": ["country"],
         "series": [{"labels": {"country": "fr"}, "value": 12}]},
        {"name": "order_value", "kind": "histogram", "doc": "Order values.", "labels": [],
         "buckets": [10.0, 100.0], "series": [
             {"labels": {}, "buckets": [1, 3, 4], "sum": 250.5, "count": 4}]},
        {"name": "basket_size", "kind": "gauge", "doc": "Items.", "labels": ["child"],
         "series": [{"labels": {"child": "0"}, "value": 3}]},
    ],
}


def sample() -> Dict[str, Any]:
    return copy.deepcopy(SAMPLE)


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory under /tmp that other users may traverse.

    Not ``tmp_path``: its parent (/tmp/pytest-of-root) is mode 0700, so a client running
    as another uid could not even reach the socket, and its paths can exceed the 107
    bytes a Unix socket address holds.
    """
    path = tempfile.mkdtemp(prefix="shsup-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Serving:
    """Runs ``serve_ready`` from a select() loop in a thread, as the supervisor's loop does."""

    def __init__(self, server: StatusServer) -> None:
        self.server = server
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.errors: List[BaseException] = []

    def loop(self) -> None:
        import select

        while not self.stop.is_set():
            try:
                ready = select.select([self.server.fileno()], [], [], 0.05)[0]
                if ready:
                    self.server.serve_ready()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return

    def __enter__(self) -> "Serving":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()
        assert not self.errors, self.errors


def recording_handler() -> Tuple[Callable[[str], Dict[str, Any]], List[str]]:
    seen: List[str] = []

    def handler(command: str) -> Dict[str, Any]:
        seen.append(command)
        if command == "status":
            return sample()
        if command == "boom":
            raise RuntimeError("handler exploded")
        return {"command": command}

    return handler, seen


# -- control socket ----------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_status_socket_round_trip_with_mode_0600(sockdir: str) -> None:
    path = os.path.join(sockdir, "supervisor.sock")
    handler, seen = recording_handler()
    server = StatusServer(path, handler)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    with Serving(server):
        assert query(path) == SAMPLE
        assert query(path, "dump") == {"command": "dump"}
        with pytest.raises(UsageError, match="internal error: RuntimeError: handler exploded"):
            query(path, "boom")
    assert seen == ["status", "dump", "boom"]
    assert not os.path.exists(path), "close() removes the socket file"


@pytest.mark.timeout(20)
def test_stale_socket_is_replaced_but_other_files_are_not(sockdir: str) -> None:
    path = os.path.join(sockdir, "supervisor.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # what a killed supervisor leaves behind: a file, nobody listening
    with pytest.raises(UsageError, match="no supervisor is running"):
        query(path)
    handler, _ = recording_handler()
    with Serving(StatusServer(path, handler)):
        assert query(path)["supervisor"]["pid"] == 4242

    regular = os.path.join(sockdir, "not-a-socket")
    with open(regular, "w") as f:
        f.write("keep me")
    with pytest.raises(UsageError, match="is not a socket"):
        StatusServer(regular, handler)
    assert open(regular).read() == "keep me"


@pytest.mark.timeout(10)
def test_query_without_a_supervisor_is_one_line(sockdir: str) -> None:
    path = os.path.join(sockdir, "supervisor.sock")
    with pytest.raises(UsageError) as info:
        query(path)
    message = str(info.value)
    assert "\n" not in message
    assert message == f"no supervisor is running for datadir {sockdir} (no socket at {path})"


@pytest.mark.timeout(10)
def test_too_long_socket_path_is_a_usage_error(sockdir: str) -> None:
    path = os.path.join(sockdir, "d" * 120, "supervisor.sock")
    with pytest.raises(UsageError, match="too long"):
        StatusServer(path, lambda c: {})
    with pytest.raises(UsageError, match="too long"):
        query(path)


def _query_as(uid: int, path: str) -> Dict[str, Any]:
    """Runs ``query(path)`` in a forked child that dropped to ``uid``; returns what it got:
    {"reply": ...}, {"usage_error": msg} or {"raw": ...} (see ``raw``)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                result: Dict[str, Any] = {"reply": query(path, timeout=5)}
            except UsageError as exc:
                result = {"usage_error": str(exc)}
            os.write(w, json.dumps(result).encode())
        except BaseException as exc:  # noqa: BLE001
            os.write(w, json.dumps({"crash": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks).decode())
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


def _raw_as(uid: int, path: str) -> bytes:
    """What a client of ``uid`` reads back after sending ``status`` on a raw socket."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(path)
                sock.sendall(b"status\n")
                data = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            os.write(w, data)
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return data


@pytest.mark.timeout(20)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_client_of_another_uid_is_refused(sockdir: str) -> None:
    path = os.path.join(sockdir, "supervisor.sock")
    handler, seen = recording_handler()
    with Serving(StatusServer(path, handler)):
        # layer 1: the file mode (0600) keeps it from connecting at all
        got = _query_as(NOBODY, path)
        assert "permission denied" in got.get("usage_error", ""), got
        assert "\n" not in got["usage_error"]
        # layer 2: with the mode loosened, SO_PEERCRED still refuses it
        os.chmod(path, 0o666)
        assert json.loads(_raw_as(NOBODY, path)) == {"error": "permission denied"}
        got = _query_as(NOBODY, path)
        assert got.get("usage_error", "").endswith("refused 'status': permission denied"), got
        # root (and the supervisor's own uid) are answered
        assert query(path) == SAMPLE
    assert seen == ["status"], "the handler never ran for the refused clients"


@pytest.mark.timeout(20)
def test_misbehaving_clients_never_raise_into_the_loop(sockdir: str) -> None:
    path = os.path.join(sockdir, "supervisor.sock")
    handler, seen = recording_handler()
    server = StatusServer(path, handler)
    try:
        clients = []

        def connect(payload: Optional[bytes]) -> socket.socket:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            if payload is not None:
                c.sendall(payload)
            clients.append(c)
            return c

        gone = connect(None)
        gone.close()                                   # connects and leaves at once
        silent = connect(None)                         # connects and never writes
        long = connect(b"x" * (MAX_REQUEST + 100))     # no newline within 1 KiB
        binary = connect(b"\xff\xfe\n")                # not UTF-8
        good = connect(b"status\n")                    # served after all of those
        unterminated = connect(b"dump")
        unterminated.shutdown(socket.SHUT_WR)          # `echo -n dump | socat ...`

        started = time.monotonic()
        served = server.serve_ready()
        took = time.monotonic() - started
        assert took < 2.5, f"a silent client held the loop for {took:.1f}s"
        assert served >= 4
        assert server.serve_ready() == 0               # nothing left; does not block

        def reply(c: socket.socket) -> Any:
            c.settimeout(2)
            data = b""
            try:
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            return json.loads(data) if data else None

        assert reply(silent) is None                   # dropped after the timeout
        assert "bad request" in reply(long)["error"]
        assert "bad request" in reply(binary)["error"]
        assert reply(good) == SAMPLE
        assert reply(unterminated) == {"command": "dump"}
        assert seen == ["status", "dump"]
        for c in clients:
            c.close()
    finally:
        server.close()


# -- format_status -----------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_format_status_shows_supervisor_and_one_row_per_child() -> None:
    text = format_status(sample())
    lines = text.splitlines()
    assert "4242" in lines[0] and "proj" in lines[0] and "running" in lines[0] and "1h02m" in lines[0]
    assert "stable" in text and "generation 7" in text and "rdkafka-1234-abcd" in text
    assert "localhost:9092" in text
    header = next(i for i, line in enumerate(lines) if line.startswith("CHILD"))
    row0, row1 = lines[header + 1], lines[header + 2]
    assert "5001" in row0 and "0_0,0_2" in row0 and "running" in row0 and "1523.2" in row0
    assert "987654" in row0 and "50.0" in row0 and "37.5" in row0 and " 15 " in row0
    assert "5002" in row1 and "0_1,0_3" in row1 and "restoring" in row1 and "7+?" in row1
    assert "ZeroDivisionError: division by zero in agent process" in row1   # one line
    assert row1.endswith("...") and len(row1) < 200                         # truncated
    assert "4 tasks" not in text and "2 restoring" in text and "2 running" in text


@pytest.mark.timeout(10)
def test_format_status_without_children_and_with_missing_fields() -> None:
    text = format_status({"supervisor": {"pid": 1, "app": "a", "state": "starting",
                                         "group": {"state": "joining"}},
                          "children": [], "tasks": {}})
    assert "starting" in text and "joining" in text and "no children" in text
    assert format_status({})  # a reply from another version must still print something


# -- web endpoint ------------------------------------------------------------------------

def _get(url: str) -> Tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


@pytest.fixture
def web() -> Iterator[Tuple[WebServer, Dict[str, Any]]]:
    state = sample()
    server = WebServer("127.0.0.1", 0, lambda: copy.deepcopy(state))
    server.start()
    try:
        yield server, state
    finally:
        server.stop()


def _families(text: str) -> Dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(families: Dict[str, Any], name: str) -> Dict[Tuple[Tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples}


@pytest.mark.timeout(20)
def test_web_status_and_metrics(web: Tuple[WebServer, Dict[str, Any]]) -> None:
    server, _ = web
    base = f"http://127.0.0.1:{server.port}"
    code, ctype, body = _get(base + "/status")
    assert code == 200 and ctype.startswith("application/json")
    assert json.loads(body) == SAMPLE

    code, ctype, body = _get(base + "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    fam = _families(body.decode())
    app = ("app", "proj")
    assert fam["shardsup_records_processed"].type == "counter"
    assert _samples(fam, "shardsup_records_processed") == {
        (app, ("partition", "0"), ("task", "0_0"), ("topic", "in")): 600000,
        (app, ("partition", "2"), ("task", "0_2"), ("topic", "in")): 387654}
    assert _samples(fam, "shardsup_errors") == {(app, ("child", "0")): 2, (app, ("child", "1")): 0}
    assert fam["shardsup_task_lag"].type == "gauge"
    assert _samples(fam, "shardsup_task_lag") == {    # 0_1's lag is unknown: no sample
        (app, ("child", "0"), ("task", "0_0")): 10, (app, ("child", "0"), ("task", "0_2")): 5,
        (app, ("child", "1"), ("task", "0_3")): 7}
    assert _samples(fam, "shardsup_task_restoring") == {
        (app, ("task", "0_0")): 0, (app, ("task", "0_1")): 1, (app, ("task", "0_2")): 0,
        (app, ("task", "0_3")): 1}
    assert _samples(fam, "shardsup_child_restarts") == {(app, ("child", "0")): 0, (app, ("child", "1")): 4}
    assert _samples(fam, "shardsup_rebalances") == {(app,): 3}
    assert _samples(fam, "shardsup_child_rss_bytes") == {(app, ("child", "0")): 52428800}
    assert _samples(fam, "shardsup_child_cpu_percent") == {(app, ("child", "0")): 37.5}
    assert _samples(fam, "shardsup_child_up") == {(app, ("child", "0")): 1, (app, ("child", "1")): 1}
    assert _samples(fam, "shardsup_group_generation") == {(app,): 7}
    # the app's own metrics, merged by the supervisor
    assert _samples(fam, "orders_seen") == {(app, ("country", "fr")): 12}
    assert fam["order_value"].type == "histogram"
    assert {(s.name, s.labels.get("le")): s.value for s in fam["order_value"].samples} == {
        ("order_value_bucket", "10.0"): 1, ("order_value_bucket", "100.0"): 3,
        ("order_value_bucket", "+Inf"): 4, ("order_value_count", None): 4,
        ("order_value_sum", None): 250.5}
    assert _samples(fam, "basket_size") == {(app, ("child", "0")): 3}
    info = fam["shardsup_supervisor_info"].samples[0]
    assert info.labels == {"app": "proj", "broker": "localhost:9092", "pid": "4242", "state": "running"}

    code, _, body = _get(base + "/nope")
    assert code == 404 and "/metrics" in json.loads(body)["paths"]


@pytest.mark.timeout(20)
def test_web_health_follows_task_states(web: Tuple[WebServer, Dict[str, Any]]) -> None:
    server, state = web
    url = f"http://127.0.0.1:{server.port}/health"
    code, _, body = _get(url)
    assert (code, json.loads(body)) == (200, {"status": "ok"})

    state["tasks"]["0_3"]["state"] = "failed"
    state["tasks"]["0_1"]["state"] = "down"
    code, _, body = _get(url)
    assert code == 503
    assert json.loads(body) == {"status": "unhealthy", "reason": "tasks not running: down: 0_1; failed: 0_3",
                                "failed": {"0_3": {"last_error": None, "retry_in_s": None}}}

    state["tasks"] = {}
    state["supervisor"]["state"] = "stopping"
    code, _, body = _get(url)
    assert (code, json.loads(body)["reason"]) == (503, "supervisor is stopping")
    state["supervisor"]["state"] = "running"
    assert _get(url)[0] == 200, "a running supervisor that owns no task is healthy"


@pytest.mark.timeout(20)
def test_web_port_in_use_is_one_line(web: Tuple[WebServer, Dict[str, Any]]) -> None:
    server, _ = web
    other = WebServer("127.0.0.1", server.port, sample)
    with pytest.raises(UsageError) as info:
        other.start()
    assert str(info.value) == f"web port 127.0.0.1:{server.port} is in use"
    other.stop()  # nothing started: a no-op
    assert _get(f"http://127.0.0.1:{server.port}/health")[0] == 200


@pytest.mark.timeout(20)
def test_web_stop_frees_the_port_and_snapshot_errors_are_500() -> None:
    def broken() -> Dict[str, Any]:
        raise RuntimeError("no snapshot")

    server = WebServer("127.0.0.1", 0, broken)
    server.start()
    port = server.port
    code, _, body = _get(f"http://127.0.0.1:{port}/status")
    assert code == 500 and "no snapshot" in json.loads(body)["error"]
    server.stop()
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{port}/status")
    again = WebServer("127.0.0.1", port, sample)
    again.start()
    try:
        assert _get(f"http://127.0.0.1:{port}/health")[0] == 200
    finally:
        again.stop()


@pytest.mark.timeout(10)
def test_metrics_escape_labels_and_every_metric_has_the_app_label() -> None:
    snap = sample()
    snap["supervisor"]["app"] = 'we"ird\\app\nname'
    text = render_metrics(snap)
    assert 'app="we\\"ird\\\\app\\nname"' in text
    fam = _families(text)
    assert fam["shardsup_supervisor_info"].samples[0].labels["app"] == 'we"ird\\app\nname'
    for family in fam.values():
        for s in family.samples:
            assert s.labels["app"] == 'we"ird\\app\nname', s
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            assert line.split()[3] in ("counter", "gauge", "histogram")


@pytest.mark.timeout(10)
def test_health_is_pure() -> None:
    assert health(sample()) == (True, {"status": "ok"})
    snap = sample()
    snap["supervisor"]["state"] = "starting"
    assert health(snap)[0] is False


# -- sd_notify ---------------------------------------------------------------------------

def _receive(sock: socket.socket, n: int) -> List[str]:
    sock.settimeout(5)
    return [sock.recv(4096).decode() for _ in range(n)]


@pytest.mark.timeout(10)
def test_sdnotify_sends_datagrams_in_order(sockdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(sockdir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.ready("consuming 8 tasks\nwith 2 children")
        assert sdnotify.status("rebalancing")
        assert sdnotify.watchdog()
        assert sdnotify.stopping()
        assert _receive(sock, 4) == ["READY=1\nSTATUS=consuming 8 tasks with 2 children",
                                     "STATUS=rebalancing", "WATCHDOG=1", "STOPPING=1"]
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert sdnotify.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        first, second = _receive(sock, 1)[0].split("\n")
        assert first == "RELOADING=1"
        key, value = second.split("=")
        assert key == "MONOTONIC_USEC" and before <= int(value) <= after


@pytest.mark.timeout(10)
def test_sdnotify_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"shardsup-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sdnotify.watchdog()
        assert _receive(sock, 2) == ["READY=1", "WATCHDOG=1"]


@pytest.mark.timeout(10)
def test_sdnotify_without_or_with_a_dead_socket_never_raises(sockdir: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(sockdir, "nobody-listens"))
    assert sdnotify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.ready() is False


@pytest.mark.timeout(10)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ("", "0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None


# -- failed tasks and the timer owner (issue 11, point 12) --------------------------------

def test_timer_owner_is_the_child_of_the_lowest_running_task() -> None:
    from supervisor.placement import choose_timer_owner

    held = ["0_0", "0_1", "0_2", "0_3"]
    assert choose_timer_owner({0: ["0_0", "0_2"], 1: ["0_1", "0_3"]}, held) == 0
    assert choose_timer_owner({1: ["0_1", "0_3"]}, held) == 1          # 0_0's child failed
    assert choose_timer_owner({3: ["0_10"], 2: ["0_9"], 4: []}, ["0_0", "0_9", "0_10"]) == 2
    assert choose_timer_owner({0: ["1_0"], 1: ["0_5"]}, ["0_0", "1_0", "0_5"]) == 1
    assert choose_timer_owner({}, held) is None
    assert choose_timer_owner({0: []}, held) is None
    # another supervisor of the group holds 0_0: its child runs the timers, none of ours
    assert choose_timer_owner({0: ["0_1", "0_3"]}, ["0_1", "0_3"]) is None


def test_a_failed_slot_is_tried_again_after_its_backoff_with_a_clean_history() -> None:
    from supervisor.children import ChildSlot

    slot = ChildSlot(0, ["0_0"])
    slot.started_at = 100.0
    for now in (101.0, 102.0):
        delay = slot.schedule_restart(now, max_crashes=2, window=60.0)
    assert delay is None and slot.state == "failed"
    slot.fail(102.0, retry_after=300.0)
    assert slot.retry_at == 402.0 and not slot.alive
    assert not slot.retry_due(401.9) and slot.state == "failed"
    assert slot.retry_due(402.0)
    assert slot.state == "down" and slot.crashes == [] and slot.hangs == 0 and slot.retry_at is None
    assert not slot.retry_due(500.0)  # once


def test_a_child_that_said_nothing_still_leaves_an_error() -> None:
    from supervisor.children import ChildSlot

    slot = ChildSlot(0, ["0_0"])
    slot.note_exit(7)
    assert slot.last_error == "exited with code 7"
    slot.note_exit(-9)
    assert slot.last_error == "killed by signal 9"
    slot.last_error, slot.error_reported = "RuntimeError: boom", True
    slot.note_exit(3)
    assert slot.last_error == "RuntimeError: boom"


def test_health_and_status_carry_a_failed_tasks_error() -> None:
    snapshot = sample()
    snapshot["tasks"]["0_1"].update(state="failed", last_error="RuntimeError: boom\nline two",
                                    retry_in_s=250.0)
    ok, body = health(snapshot)
    assert not ok
    assert body["failed"] == {"0_1": {"last_error": "RuntimeError: boom\nline two", "retry_in_s": 250.0}}
    text = format_status(snapshot)
    assert "FAILED      0_1: RuntimeError: boom line two (tried again in 4m10s)" in text


# -- broker outages (issue 11, point 7) ---------------------------------------------------

def test_errors_of_an_unreachable_broker_are_told_from_refusals() -> None:
    from confluent_kafka import KafkaError

    from shardworker.broker_wait import broker_unreachable, says_broker_unreachable

    for code in (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                 KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_LEADER_FOR_PARTITION):
        assert broker_unreachable(KafkaError(code))
        assert says_broker_unreachable(f"proj-out: {KafkaError(code).str()}")
    for code in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED,
                 KafkaError._INVALID_ARG):
        assert not broker_unreachable(KafkaError(code))
        assert not says_broker_unreachable(f"proj-out: {KafkaError(code).str()}")


def test_a_child_stopped_by_the_broker_says_so_and_exits_75() -> None:
    from confluent_kafka import KafkaError, KafkaException

    from shardworker.child import report_failure
    from shardworker.broker_wait import BrokerUnavailable
    from shardworker.protocol import EXIT_BROKER_UNAVAILABLE, Channel, Failed

    ours, theirs = socket.socketpair()
    child, supervisor = Channel(theirs), Channel(ours)
    try:
        cases = [(BrokerUnavailable("outputs timed out"), EXIT_BROKER_UNAVAILABLE, True),
                 (KafkaException(KafkaError(KafkaError._TRANSPORT)), EXIT_BROKER_UNAVAILABLE, True),
                 (KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)), 3, False),
                 (ZeroDivisionError("division by zero"), 3, False)]
        for exc, code, unavailable in cases:
            assert report_failure(child, exc) == code
            deadline = time.monotonic() + 5
            messages: List[Any] = []
            while not messages and time.monotonic() < deadline:
                messages = supervisor.receive()
            assert isinstance(messages[0], Failed) and messages[0].broker_unavailable is unavailable
    finally:
        child.close()
        supervisor.close()


@pytest.mark.timeout(10)
def test_a_child_keeps_the_garbage_collectors_scans_off_the_record_path() -> None:
    import gc
    import weakref

    from shardworker.child import GC_YOUNG_THRESHOLD, tune_gc

    class Node:
        pass

    before = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    try:
        gc.set_threshold(700, 10, 10)
        cycle = Node()
        cycle.me = cycle  # type: ignore[attr-defined]
        gone = weakref.ref(cycle)
        del cycle
        tune_gc()
        assert gone() is None  # start-up's garbage is collected, not frozen for good
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() > frozen_before
        gc.set_threshold(50_000, 5, 5)
        tune_gc()
        assert gc.get_threshold() == (50_000, 5, 5)  # an app's higher threshold stays
        gc.set_threshold(0, 5, 5)
        tune_gc()
        assert gc.get_threshold()[0] == 0  # and so does "no automatic collection"
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_an_outage_restart_backs_off_without_counting_a_crash() -> None:
    from shardworker.protocol import Stats
    from supervisor.children import BACKOFF_MAX, ChildSlot

    slot = ChildSlot(0, ["0_0"])
    delays = [slot.schedule_outage_restart(float(n)) for n in range(12)]
    assert delays[:3] == [0.1, 0.2, 0.4] and delays[-1] == BACKOFF_MAX
    assert slot.crashes == [] and slot.state == "down"
    slot.record_stats(Stats(processed=10))
    assert slot.schedule_outage_restart(100.0) == 0.1  # it got through: the backoff starts afresh


class _Member:
    """Stands in for the group member: start offsets fail while ``down`` is set."""

    def __init__(self) -> None:
        self.down = True

    def start_offsets(self, keys):  # type: ignore[no-untyped-def]
        from confluent_kafka import KafkaError, KafkaException

        if self.down:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return {key: 7 for key in keys}


def test_an_assignment_whose_offsets_time_out_is_placed_on_a_later_turn(tmp_path, monkeypatch) -> None:
    import shardworker
    from supervisor.arbiter import Arbiter

    app = shardworker.App("proj")
    app.topic("proj-in", partitions=2)
    app.agent(app.topics["proj-in"])(lambda stream: stream)
    arb = Arbiter(app, "proj", 2, "kafka://x:1", str(tmp_path))
    arb.member = _Member()  # type: ignore[assignment]
    assignment = arb.assignment  # the rebalance moves live in supervisor/rebalance.py
    placed: List[Any] = []
    monkeypatch.setattr(assignment, "place", placed.append)
    keys = [("proj-in", 0), ("proj-in", 1)]
    assignment.on_assign(keys)  # inside librdkafka's callback: must not raise
    assert assignment.joined and assignment.unplaced == keys and placed == []
    assert assignment.next_placement > 0  # a retry is due in PLACE_RETRY seconds; make it now
    assignment.next_placement = 0.0
    arb.member.down = False  # type: ignore[attr-defined]
    assignment.place_unplaced()
    assert placed == [keys] and assignment.unplaced == [] and assignment.offsets == {k: 7 for k in keys}
    assignment.on_lost([("proj-in", 5)])  # never placed: nothing to take back, nothing raised
