"""Sub-topologies and tasks: the unit of state, commit and movement (Kafka Streams'
partition groups).

A sub-topology is a set of source topics linked by the tables their agents use (an agent
that re-keys with ``group_by`` or ``through`` links its tables to the topic it re-keys
into, not to the topic it reads first).  Its topics must be co-partitioned.  Task
``"<i>_<p>"`` of sub-topology *i* owns partition *p* of every one of its source topics and
partition *p* of its tables' changelogs.  Sub-topology *i*'s first topic is its *leader*:
the supervisor's group subscribes to leaders only, so whoever holds partition *p* of the
leader holds the whole task (the group's cooperative-sticky assignor does not keep
partitions of different topics together; DESIGN.md, "Sub-topologies").

Both the supervisor and its children use this mapping, so it lives here and nowhere else;
:mod:`shardworker.graph` finds an app's sub-topologies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Sequence, Tuple

TopicPartitionKey = Tuple[str, int]

#: the one ``(topic, partition)`` tuple of each source in this process (:func:`source_key`)
_SOURCE_KEYS: Dict[TopicPartitionKey, TopicPartitionKey] = {}


def source_key(topic: str, partition: int) -> TopicPartitionKey:
    """The process's one tuple for ``(topic, partition)``: a dict keyed by it (a task's
    tables by partition, their stored offsets) finds a record's source by identity,
    without comparing the tuples' contents (:func:`sources_of` gives records theirs)."""
    tp = (topic, partition)
    return _SOURCE_KEYS.setdefault(tp, tp)


def sources_of(records: Sequence[Any]) -> List[TopicPartitionKey]:
    """Each consumed record's ``(topic, partition)``, its :func:`source_key`, made in C
    (map), not per record in Python: the record path counts and positions a batch with
    it.  The records of a batch are of one class (``confluent_kafka.Message``, or the
    test driver's): its methods themselves are mapped, a quarter of what a bound method
    per record costs.  A batch of one topic (the common one) maps partitions, small
    ints, to their keys."""
    if not records:
        return []
    kind = type(records[0])
    partitions = list(map(kind.partition, records))
    topics = set(map(kind.topic, records))
    if len(topics) == 1:
        topic = topics.pop()
        keys = {p: source_key(topic, p) for p in set(partitions)}
        return list(map(keys.__getitem__, partitions))
    made = list(zip(map(kind.topic, records), partitions))
    return list(map(_SOURCE_KEYS.setdefault, made, made))


def offsets_of(records: Sequence[Any]) -> List[int]:
    """Each consumed record's offset (as :func:`sources_of`)."""
    if not records:
        return []
    return list(map(type(records[0]).offset, records))


@dataclass(frozen=True)
class SubTopology:
    """Sub-topology ``index``: the topics its tasks read and the tables they hold."""

    index: int
    sources: Tuple[str, ...]
    tables: Tuple[str, ...] = ()

    @property
    def leader(self) -> str:
        """The topic the group assigns for this sub-topology's tasks."""
        return self.sources[0]


class Topology:
    """The app's sub-topologies, and the task of every source topic-partition."""

    def __init__(self, subtopologies: Sequence[SubTopology]) -> None:
        self.subtopologies: List[SubTopology] = list(subtopologies)
        self._index: Dict[str, int] = {}
        for sub in self.subtopologies:
            for topic in sub.sources:
                if topic in self._index:
                    raise ValueError(f"topic {topic!r} is in two sub-topologies")
                self._index[topic] = sub.index

    @classmethod
    def of_sources(cls, topics: Sequence[str]) -> "Topology":
        """One sub-topology per topic, without tables (for tests and stateless apps)."""
        return cls([SubTopology(i, (t,)) for i, t in enumerate(topics)])

    def __repr__(self) -> str:
        return "<Topology " + "; ".join(
            f"{s.index}: {','.join(s.sources)} [{','.join(s.tables)}]" for s in self.subtopologies) + ">"

    @property
    def source_topics(self) -> List[str]:
        """Every topic a task reads, sub-topology by sub-topology."""
        return [t for sub in self.subtopologies for t in sub.sources]

    @property
    def leaders(self) -> List[str]:
        """The topics the supervisor's group subscribes to: one per sub-topology."""
        return [sub.leader for sub in self.subtopologies]

    def task_id(self, topic: str, partition: int) -> str:
        """The task that owns ``topic``'s ``partition``."""
        try:
            return f"{self._index[topic]}_{partition}"
        except KeyError:
            raise ValueError(f"{topic!r} is not a source topic of the app") from None

    def subtopology(self, task: str) -> SubTopology:
        """The sub-topology task ``task`` belongs to."""
        return self.subtopologies[int(task.partition("_")[0])]

    def task_partitions(self, task: str) -> List[TopicPartitionKey]:
        """The topic-partitions that make up ``task``: its partition of every source."""
        sub, _, part = task.partition("_")
        return [(topic, int(part)) for topic in self.subtopologies[int(sub)].sources]

    def group_by_task(self, partitions: Iterable[TopicPartitionKey]
                      ) -> Dict[str, List[TopicPartitionKey]]:
        """Groups topic-partitions by the task they belong to (foreign topics are ignored)."""
        tasks: Dict[str, List[TopicPartitionKey]] = {}
        index = self._index
        for topic, partition in partitions:
            sub = index.get(topic)
            if sub is not None:
                tasks.setdefault(f"{sub}_{partition}", []).append((topic, partition))
        return tasks

    def whole_tasks(self, partitions: Iterable[TopicPartitionKey]) -> List[TopicPartitionKey]:
        """Every topic-partition of the tasks of ``partitions`` (the group hands out leader
        partitions; a task is all of its sources' partitions)."""
        out: List[TopicPartitionKey] = []
        for task in self.group_by_task(partitions):
            out.extend(tp for tp in self.task_partitions(task) if tp not in out)
        return out

    def subtopology_of_table(self, table: str) -> SubTopology:
        """The sub-topology whose tasks hold ``table``."""
        for sub in self.subtopologies:
            if table in sub.tables:
                return sub
        raise ValueError(f"no sub-topology holds table {table!r}")


def task_sort_key(task: str) -> Tuple[int, int]:
    """Orders tasks numerically: 0_2 before 0_10."""
    sub, _, part = task.partition("_")
    return int(sub), int(part)
