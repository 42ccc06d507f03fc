"""Typed records end to end (README, "Serializers and typed records"): JSON orders from
a plain producer reach the agent as dataclasses through a real ``shardsup start``, the
re-keyed stream and the sinks carry records, and a record that does not make an
``Order`` is dead-lettered with the failing field named in ``shardsup.error``."""
from __future__ import annotations

import json

import pytest

from tests.conftest import produce, read_topic

USERS = 5
N = 500


@pytest.mark.timeout(120)
def test_typed_records_flow_and_a_bad_one_is_dead_lettered_with_its_field(broker, prefix,
                                                                          start_supervisor):
    sup = start_supervisor("tests.apps.typed_orders", "-c", "1")
    sup.wait_for(lambda: len(sup.child_tasks()) == 1, 30, "one child")
    batch = [(f"o{n}".encode(), json.dumps({"id": f"o{n}", "user": f"u{n % USERS}",
                                            "amount": n}).encode(), n % 2)
             for n in range(N)]
    batch[7] = (b"bad-type", json.dumps({"id": "o7", "user": "u2", "amount": "ten"}).encode(), 1)
    batch[12] = (b"no-user", json.dumps({"id": "o12", "amount": 12}).encode(), 0)
    produce(broker, f"{prefix}-orders", batch)
    good = [n for n in range(N) if n not in (7, 12)]

    expected = {f"u{u}": (sum(1 for n in good if n % USERS == u),
                          sum(n for n in good if n % USERS == u)) for u in range(USERS)}

    def final_totals(messages):  # the last total per user, once every user reached it
        last = {}
        for msg in messages:
            total = json.loads(msg.value())
            assert set(total) == {"user", "orders", "amount"} and msg.key() == total["user"].encode()
            last[total["user"]] = max(last.get(total["user"], (0, 0)),
                                      (total["orders"], total["amount"]))
        return last

    totals = read_topic(broker, f"{prefix}-totals", 0, timeout=60,
                        until=lambda msgs: final_totals(msgs) == expected)
    assert final_totals(totals) == expected

    big = read_topic(broker, f"{prefix}-big", N - 100, timeout=30)
    assert {json.loads(m.value())["id"] for m in big} == {f"o{n}" for n in good if n >= 100}
    assert all(json.loads(m.value())["note"] == "big" for m in big)

    dead = read_topic(broker, f"{prefix}-total-dlq", 2, timeout=30)
    errors = {m.key(): dict(m.headers())["shardsup.error"] for m in dead}
    assert errors == {b"bad-type": b"RecordError: Order.amount: expected int, got str",
                      b"no-user": b"RecordError: Order.user: required field missing"}
    assert sup.stop() == 0, sup.output()[-3000:]
