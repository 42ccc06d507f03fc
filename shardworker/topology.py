"""Tasks: the unit of state, commit and movement (Kafka Streams' partition groups).

Sub-topology *i* is the *i*-th distinct source topic of the app's agents; task
``"<i>_<p>"`` is partition *p* of it.  Both the supervisor and its children use this
mapping, so it lives here and nowhere else.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

TopicPartitionKey = Tuple[str, int]


def task_id(source_topics: Sequence[str], topic: str, partition: int) -> str:
    """The task that owns ``topic``'s ``partition``."""
    return f"{source_topics.index(topic)}_{partition}"


def task_partitions(source_topics: Sequence[str], task: str) -> List[TopicPartitionKey]:
    """The topic-partitions that make up ``task``."""
    sub, _, part = task.partition("_")
    return [(source_topics[int(sub)], int(part))]


def group_by_task(source_topics: Sequence[str],
                  partitions: Iterable[TopicPartitionKey]) -> Dict[str, List[TopicPartitionKey]]:
    """Groups topic-partitions by the task they belong to (foreign topics are ignored)."""
    tasks: Dict[str, List[TopicPartitionKey]] = {}
    for topic, partition in partitions:
        if topic in source_topics:
            tasks.setdefault(task_id(source_topics, topic, partition), []).append((topic, partition))
    return tasks


def task_sort_key(task: str) -> Tuple[int, int]:
    """Orders tasks numerically: 0_2 before 0_10."""
    sub, _, part = task.partition("_")
    return int(sub), int(part)
