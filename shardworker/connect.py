"""Connecting a new producer to a broker before it needs its producer id.

librdkafka answers a client's first metadata request over the bootstrap connection, then
drops that connection for the brokers the answer names, and opens one of those only when
a request needs it.  A producer's producer-id state machine (idempotent and
transactional producers alike) that runs while no such connection is up finds no broker
and tries again 0.5 s later: the first batch of a new child waited 0.5 to 1 s for its
acknowledgements, a child's eight ``init_transactions`` took 0.51 s instead of 25 ms
(docs/benchmark.md, "Startup").  :func:`connect` makes that connection first.
"""
from __future__ import annotations

from typing import Any, Optional

from confluent_kafka import KafkaException

#: seconds each metadata request may take (a warm-up: late is not an error)
CONNECT_WAIT = 2.0


def connect(client: Any, topic: Optional[str], timeout: float = CONNECT_WAIT) -> None:
    """Asks twice for ``topic``'s metadata (None: every topic's): the second answer comes
    over a connection to a broker the first one named.  An unreachable broker is left
    to the calls that need it (they wait it out)."""
    for _ in range(2):
        try:
            client.list_topics(topic, timeout=timeout)
        except KafkaException:
            return
