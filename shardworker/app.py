"""The user-facing API: an App declares topics, agents and timers; nothing runs at import."""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .codecs import Serializer, batch_decoder, get_codec, present_decoder
from .crontab import CronExpression, Crontab, StartupTask, Zone, resolve_zone
from .metrics import DEFAULT_BUCKETS, Counter, Gauge, Histogram, MetricRegistry
from .produce import UNASSIGNED, produce
from .records import typed_codec
from .windows import event_time_ms

if TYPE_CHECKING:  # pragma: no cover
    from .topology import Topology

EMBEDDED = "embedded://"

#: Settings an App accepts, with their defaults.  Each is also documented in the README.
DEFAULT_SETTINGS: Dict[str, Any] = {
    # where the offsets of a partition with no committed offset start: earliest | latest
    "auto_offset_reset": "earliest",
    # the supervisor is the only group member and polls all the time, so it can use a
    # short session: a dead *machine* is noticed in this time; a dead child never is.
    "session_timeout_ms": 10_000,
    # most records a child takes from its consumer per batch
    "batch_size": 1000,
    # how often offsets are committed (seconds): by the supervisor, for what its children
    # reported (at_least_once); by each task's transaction (exactly_once).  None: 1.0 s
    # at-least-once, 0.1 s exactly-once (Kafka Streams' defaults)
    "commit_interval": None,
    # partitions of a topic created by the app when its declaration names none;
    # None asks the broker for its default
    "topic_partitions": None,
    # ms a producer waits to fill a batch (librdkafka's linger.ms, 5 by default; Kafka
    # Streams uses 100): larger batches cost the broker fewer requests a record, which
    # is what let -c 2 scale on two cores shared with the broker (docs/benchmark.md,
    # "Producer batches")
    "producer_linger_ms": 50,
    # extra librdkafka settings for every client (consumer, producer, admin)
    "kafka_config": {},
    # at_least_once: outputs may repeat after a crash, table state never double-counts;
    # exactly_once: outputs, changelogs and offsets of a task commit in one transaction
    "processing_guarantee": "at_least_once",
}


GUARANTEES = ("at_least_once", "exactly_once")
#: where a partition without a committed offset starts
OFFSET_RESETS = ("earliest", "latest")
#: ms before a consumer fetches again a partition whose local queue was full
#: (:meth:`App.consumer_config`)
FETCH_QUEUE_BACKOFF_MS = 20


def bootstrap_servers(broker: str) -> str:
    """Turns ``kafka://h1:9092;h2:9092`` (or a bare ``h:p``) into librdkafka's list."""
    if broker.startswith("kafka://"):
        broker = broker[len("kafka://"):]
    return ",".join(part.strip().rstrip("/") for part in broker.replace(";", ",").split(",") if part.strip())


class Topic:
    """A Kafka topic the app reads or writes, with its key and value serializers."""

    def __init__(self, app: "App", name: str, partitions: Optional[int] = None,
                 key_serializer: Serializer = "raw", value_serializer: Serializer = "json",
                 like: Optional[str] = None, value_type: Optional[type] = None,
                 timestamp: Optional[Callable[[Any], Any]] = None) -> None:
        self.app = app
        #: ``fn(value)`` -> the record's event time (seconds since the epoch or a
        #: datetime); None: the Kafka timestamp (DESIGN.md, "Windows and time")
        self.timestamp = timestamp
        self.name = name
        self.partitions = partitions
        #: an internal topic created with ``like``'s partition count when none is given
        self.like = like
        self.key_serializer = key_serializer
        self.value_serializer = value_serializer
        #: values are records of this dataclass (or pydantic model): shardworker.records
        self.value_type = value_type
        self.encode_key, self.decode_key = get_codec(key_serializer, name, "key")
        #: a key that is not None, decoded faster than by ``decode_key`` (or None)
        self.decode_present_key = present_decoder(key_serializer, name, "key")
        values = typed_codec(value_serializer, value_type, name)
        self.encode_value, self.decode_value = get_codec(values, name, "value")
        #: a batch's values at once, or an error (then one by one: ``decode_value``);
        #: None: one by one always
        self.decode_values = batch_decoder(values, name, "value")

    def __repr__(self) -> str:
        return f"<Topic {self.name}>"

    def event_time_ms(self, value: Any) -> int:
        """The event time (epoch ms) of a record's decoded ``value``, by the topic's
        ``timestamp`` function; raises when it has none or gives no time."""
        return event_time_ms(self.timestamp(value))  # type: ignore[misc]

    def send_soon(self, key: Any = None, value: Any = None,
                  headers: Optional[Dict[str, Union[str, bytes]]] = None,
                  partition: Optional[int] = None) -> None:
        """Queues a record for this topic.  Inside an agent it is acknowledged before the
        input record's offset is committed; elsewhere call ``app.flush()``."""
        self.app.producer_send(self.name, self.encode_key(key), self.encode_value(value),
                               headers, partition)

    async def send(self, key: Any = None, value: Any = None,
                   headers: Optional[Dict[str, Union[str, bytes]]] = None,
                   partition: Optional[int] = None) -> None:
        """``await topic.send(...)``: the same as :meth:`send_soon`, for async agents."""
        self.send_soon(key, value, headers, partition)


class Topics:
    """Several topics one agent reads (``app.topic("a", "b")``, as in Faust)."""

    def __init__(self, topics: Sequence[Topic]) -> None:
        self.topics = list(topics)

    def __repr__(self) -> str:
        return f"<Topics {', '.join(t.name for t in self.topics)}>"


ERROR_POLICIES = ("dlq", "skip", "crash")


@dataclass
class Agent:
    """A user function that consumes one or more topics; what it yields goes to every
    sink.  ``regroup`` (found before start: :mod:`shardworker.graph`) says where its
    stream is re-keyed, if it is."""

    app: "App"
    fn: Callable[..., Any]
    topics: List[Topic]
    sinks: List[Topic]
    name: str
    on_error: str = "dlq"
    #: tables the agent uses that reading its source cannot find (see shardworker.graph)
    tables: List[Any] = field(default_factory=list)
    is_async: bool = field(init=False)
    regroup: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.is_async = inspect.isasyncgenfunction(self.fn) or inspect.iscoroutinefunction(self.fn)

    @property
    def topic(self) -> Topic:
        """The agent's (first) topic: where :meth:`send` goes."""
        return self.topics[0]

    @property
    def dlq_topic(self) -> str:
        """Where records go whose decoding or processing raised (policy ``dlq``)."""
        return f"{self.app.id}-{self.name}-dlq"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The decorated function itself (the decorator returns the agent, as Faust's)."""
        return self.fn(*args, **kwargs)

    def send_soon(self, key: Any = None, value: Any = None,
                  headers: Optional[Dict[str, Union[str, bytes]]] = None,
                  partition: Optional[int] = None) -> None:
        """Queues a record for the agent's own topic (Faust's ``agent.send``)."""
        self.topic.send_soon(key, value, headers, partition)

    async def send(self, key: Any = None, value: Any = None,
                   headers: Optional[Dict[str, Union[str, bytes]]] = None,
                   partition: Optional[int] = None) -> None:
        """``await agent.send(key=..., value=...)``: a record for the agent's topic."""
        self.topic.send_soon(key, value, headers, partition)

    def test_context(self) -> Any:
        """``async with agent.test_context() as agent: await agent.put(value, key=...)``
        (or a plain ``with``): runs this agent alone over the records put, with no broker
        and no child process (Faust's ``test_context``; :mod:`shardworker.testing`)."""
        from .testing import AgentTestContext

        return AgentTestContext(self)


@dataclass
class Timer:
    """A function run every ``interval`` seconds in exactly one child of the group:
    the one the supervisor names, hosting its lowest running task (normally ``0_0``)."""

    fn: Callable[[], Any]
    interval: float
    name: str


class App:
    """A stream-processing application: its id is the consumer group and topic prefix."""

    def __init__(self, id: str, broker: str = "kafka://localhost:9092", **settings: Any) -> None:
        unknown = set(settings) - set(DEFAULT_SETTINGS)
        if unknown:
            raise TypeError(f"unknown App setting(s): {', '.join(sorted(unknown))}")
        self.id = id
        self.broker = broker
        self.settings: Dict[str, Any] = {**DEFAULT_SETTINGS, **settings}
        self.topics: Dict[str, Topic] = {}
        self.agents: List[Agent] = []
        self.timers: List[Timer] = []
        self.crontabs: List[Crontab] = []
        self.startup_tasks: List[StartupTask] = []
        self.tables: List[Any] = []   # shardworker.tables.Table, in declaration order
        self.global_tables: List[Any] = []   # shardworker.globaltables.GlobalTable
        self._producer: Any = None
        self._topology: Optional["Topology"] = None
        #: in a worker: the origin header of a record sent to a topic (shardworker.origins)
        self._origin_header: Optional[Callable[[str], Optional[Tuple[str, bytes]]]] = None
        self._producer_errors: Optional[List[str]] = None  # None: a worker's producer
        #: user metrics (app.counter, app.histogram, app.gauge): shardworker.metrics
        self.metrics = MetricRegistry()
        if self.settings["processing_guarantee"] not in GUARANTEES:
            raise ValueError(f"processing_guarantee {self.settings['processing_guarantee']!r}: "
                             f"use one of {', '.join(map(repr, GUARANTEES))}")
        if self.settings["auto_offset_reset"] not in OFFSET_RESETS:
            # librdkafka's other spellings ("smallest", "end", "error") are refused: the
            # supervisor and shardworker/beginning.py read the setting as one of these two
            raise ValueError(f"auto_offset_reset {self.settings['auto_offset_reset']!r}: "
                             f"use one of {', '.join(map(repr, OFFSET_RESETS))}")
        linger = self.settings["producer_linger_ms"]
        if isinstance(linger, bool) or not isinstance(linger, int) or not 0 <= linger <= 900_000:
            raise ValueError(f"producer_linger_ms {linger!r}: use a whole number of ms, "
                             "0 to 900000")
        if self.settings["commit_interval"] is None:
            self.settings["commit_interval"] = 0.1 if self.exactly_once else 1.0

    @property
    def exactly_once(self) -> bool:
        """True when each task commits its outputs and offsets in one transaction."""
        return bool(self.settings["processing_guarantee"] == "exactly_once")

    def __repr__(self) -> str:
        return f"<App {self.id}>"

    # -- declarations -------------------------------------------------------------
    def topic(self, name: str, *more: str, partitions: Optional[int] = None,
              key_serializer: Serializer = "raw", value_serializer: Serializer = "json",
              internal_like: Optional[str] = None, value_type: Optional[type] = None,
              timestamp: Optional[Callable[[Any], Any]] = None) -> Any:
        """Declares a topic; it is created when the app starts if the broker lacks it.
        With several names (``app.topic("a", "b")``): a :class:`Topics` for an agent
        that reads them all, each declared with the same settings.  Serializers are
        registered names or codec objects (:mod:`shardworker.codecs`); ``value_type``
        (a dataclass or pydantic model) makes values typed records
        (:mod:`shardworker.records`); ``timestamp`` (``fn(value)`` -> seconds since the
        epoch or a datetime) gives records their event time for windows (else the Kafka
        timestamp; a record it fails on is dead-lettered like a decode error)."""
        if more:
            return Topics([self.topic(n, partitions=partitions, key_serializer=key_serializer,
                                      value_serializer=value_serializer, value_type=value_type,
                                      timestamp=timestamp)
                           for n in (name, *more)])
        if name in self.topics:
            existing = self.topics[name]
            if partitions is not None and existing.partitions not in (None, partitions):
                raise ValueError(f"topic {name!r} declared twice with different partitions")
            if timestamp is not None:
                existing.timestamp = timestamp
            return existing
        topic = Topic(self, name, partitions, key_serializer, value_serializer, internal_like,
                      value_type, timestamp)
        self.topics[name] = topic
        return topic

    def agent(self, topic: Union[Topic, Topics, Sequence[Topic]], sink: Sequence[Topic] = (),
              name: Optional[str] = None, on_error: str = "dlq", tables: Sequence[Any] = ()
              ) -> Callable[[Callable[..., Any]], "Agent"]:
        """Decorates ``async def f(stream)`` (or plain ``def f(stream)``) to consume ``topic``
        (a topic, ``app.topic("a", "b")`` or a list of topics).

        ``tables``: tables the agent uses that :mod:`shardworker.graph` cannot find in its
        source (it reads the agent's body and the module functions it calls).

        ``on_error`` says what happens to a record that cannot be decoded or on which the
        agent raises: ``dlq`` (default) sends it to ``<app>-<agent>-dlq`` with the error in
        its headers, ``skip`` logs and drops it, ``crash`` stops the child (the record is
        then redelivered after the restart).
        """
        if on_error not in ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ERROR_POLICIES}, not {on_error!r}")

        def decorate(fn: Callable[..., Any]) -> Agent:
            agent_name = name or fn.__name__
            if any(a.name == agent_name for a in self.agents):
                raise ValueError(f"two agents named {agent_name!r}")
            topics = topic.topics if isinstance(topic, Topics) else (
                [topic] if isinstance(topic, Topic) else list(topic))
            if not topics:
                raise ValueError(f"agent {agent_name!r} reads no topic")
            agent = Agent(self, fn, topics, list(sink), agent_name, on_error, list(tables))
            self.agents.append(agent)
            return agent

        return decorate

    def table(self, name: str, default: Optional[Callable[[], Any]] = None,
              key_serializer: Serializer = "json", value_serializer: Serializer = "json") -> Any:
        """Declares a table: a dict per task, kept in LMDB and in the compacted changelog
        topic ``<app id>-<name>-changelog``, partitioned like the topics of the
        sub-topology whose agents use it (:mod:`shardworker.graph`)."""
        from .globaltables import check_new_name
        from .tables import Table

        check_new_name(self, name)
        table = Table(name, default, key_serializer, value_serializer, app_id=self.id)
        self.tables.append(table)
        return table

    #: Faust's spelling
    Table = table

    def global_table(self, name: str, topic: Union[Topic, str],
                     default: Optional[Callable[[], Any]] = None) -> Any:
        """Declares a global table: a read-only dict over every key of ``topic`` (its last
        value per key; a None value deletes), one copy per supervisor that every task
        reads (DESIGN.md, "Global tables").  ``topic`` must be declared on this app."""
        from .globaltables import GlobalTable, check_new_name, declared_topic

        check_new_name(self, name)
        table = GlobalTable(name, declared_topic(self, name, topic), default)
        self.global_tables.append(table)
        return table

    #: Faust's spelling
    GlobalTable = global_table

    def timer(self, interval: float, name: Optional[str] = None
              ) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
        """Decorates a function run every ``interval`` seconds in exactly one process of the
        whole group: the child that owns task ``0_0`` (so it moves with that task)."""

        def decorate(fn: Callable[[], Any]) -> Callable[[], Any]:
            self.timers.append(Timer(fn, float(interval), name or fn.__name__))
            return fn

        return decorate

    def crontab(self, cron_format: str, *, timezone: Zone = None, name: Optional[str] = None
                ) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
        """Decorates a function run at the times of ``cron_format`` (``"*/5 * * * *"``; six
        fields: seconds first) on ``timezone``'s clock (a zone name or tzinfo; default
        UTC), in exactly one process of the whole group: where ``@app.timer`` runs
        (DESIGN.md, "Timers, crontab and tasks")."""
        expression = CronExpression.parse(cron_format)
        zone = resolve_zone(timezone)

        def decorate(fn: Callable[[], Any]) -> Callable[[], Any]:
            self.crontabs.append(Crontab(fn, expression, zone, name or fn.__name__))
            return fn

        return decorate

    def task(self, fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None) -> Any:
        """``@app.task`` (or ``@app.task()``): a function (sync or async, taking the app or
        nothing) run once in the child that gets the timers role, when it gets it: once
        per process that holds the role (DESIGN.md, "Timers, crontab and tasks")."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.startup_tasks.append(StartupTask(fn, name or fn.__name__))
            return fn

        return decorate(fn) if fn is not None else decorate

    @property
    def has_scheduled_work(self) -> bool:
        """Timers, crontab jobs or startup tasks: one child of the group runs them."""
        return bool(self.timers or self.crontabs or self.startup_tasks)

    # -- user metrics (shardworker.metrics; DESIGN.md, "Metrics") ----------------------
    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """A counter for agents (``.inc(n)``, ``.labels(k=v).inc()``), summed over the
        children on the supervisor's ``/metrics`` as ``<name>_total``."""
        return self.metrics.register(Counter(name, doc, labels))  # type: ignore[return-value]

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        """A histogram for agents (``.observe(v)``), merged over the children."""
        return self.metrics.register(  # type: ignore[return-value]
            Histogram(name, doc, labels, buckets=buckets))

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        """A gauge for agents (``.set``, ``.inc``, ``.dec``), one series per child."""
        return self.metrics.register(Gauge(name, doc, labels))  # type: ignore[return-value]

    # -- derived facts ------------------------------------------------------------
    @property
    def topology(self) -> "Topology":
        """The app's sub-topologies (found once, from the agents' source: nothing runs)."""
        if self._topology is None:
            from .graph import build_topology

            self._topology = build_topology(self)
        return self._topology

    @property
    def source_topics(self) -> List[str]:
        """Every topic a task reads (repartition topics included), sub-topology by
        sub-topology."""
        return self.topology.source_topics

    def kafka_config(self, bootstrap: str) -> Dict[str, Any]:
        """Settings shared by every Kafka client of this app."""
        # brokers close idle connections; librdkafka reconnects, no need to log each one.
        # librdkafka's own lines go through Python logging (same format, role and file).
        # reconnect.backoff.ms: librdkafka opens a client's connections at most every half
        # of it; with its 100 ms, a new client's second connection (to the broker the
        # bootstrap one named) waited 50 ms, on the start-up path of every child (its
        # restore consumer) and supervisor (docs/benchmark.md, "Startup"). Reconnects
        # still back off exponentially to reconnect.backoff.max.ms (10 s).
        return {"bootstrap.servers": bootstrap, "log.connection.close": False,
                "reconnect.backoff.ms": 20,
                "logger": logging.getLogger("librdkafka"), **self.settings["kafka_config"]}

    def consumer_config(self, bootstrap: str) -> Dict[str, Any]:
        """Settings shared by the app's consumers that read records (the children's, their
        restore consumers, the global tables' mirror)."""
        # a partition whose local queue is full is fetched again this soon after it drains
        # (librdkafka's default, 1000 ms, stalled a consumer catching up on a backlog for
        # a second: docs/benchmark.md); the app's kafka_config may say otherwise
        return {"fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS, **self.kafka_config(bootstrap)}

    def producer_config(self, bootstrap: str) -> Dict[str, Any]:
        """An idempotent producer with Java Kafka's key partitioner (co-partitioning with
        producers written in any language) that reports only failed deliveries."""
        return {
            "linger.ms": self.settings["producer_linger_ms"],  # kafka_config may say otherwise
            **self.kafka_config(bootstrap),
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "delivery.report.only.error": True,
        }

    # -- producing outside the stream (scripts, `shardsup send`) ------------------
    def producer_send(self, topic: str, key: Optional[bytes], value: Optional[bytes],
                      headers: Optional[Dict[str, Union[str, bytes]]], partition: Optional[int]) -> None:
        """Queues one encoded record on this process's producer (the child's, in a worker)."""
        if self._producer is None:
            from confluent_kafka import Producer

            self._producer = Producer(self.producer_config(bootstrap_servers(self.resolved_broker())))
            self._producer_errors = []
        # outside a worker, failures are ours to see (a worker routes its own reports)
        on_delivery = self._delivered if self._producer_errors is not None else None
        header_list = list(headers.items()) if headers else None
        origin = self._origin_header(topic) if self._origin_header is not None else None
        if origin is not None:
            header_list = (header_list or []) + [origin]
        produce(self._producer, topic, value, key, header_list,
                on_delivery, UNASSIGNED if partition is None else partition)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None and self._producer_errors is not None:
            self._producer_errors.append(f"{msg.topic()}: {err.str()}")

    def flush(self, timeout: float = 30.0) -> None:
        """Waits until every record this process queued is acknowledged; raises if one
        was not (left unacknowledged, or refused by the broker)."""
        if self._producer is not None:
            left = self._producer.flush(timeout)
            if left:
                raise RuntimeError(f"{left} record(s) not acknowledged within {timeout}s")
            if self._producer_errors:
                errors, self._producer_errors[:] = list(self._producer_errors), []
                raise RuntimeError(f"delivery failed: {'; '.join(errors[:3])}")

    def resolved_broker(self) -> str:
        """The broker this process talks to: ``SHARDSUP_BROKER`` (set by the supervisor for
        its children and by ``--broker``) wins over the App's own setting."""
        return os.environ.get("SHARDSUP_BROKER") or self.broker
