"""Global tables with a real broker and real ``shardsup start`` processes: a stream–table
join (tests.apps.enricher) whose every output carries the looked-up value, the copy
following its topic live, one copy per supervisor, and ``shardsup table`` showing it
(DESIGN.md, "Global tables")."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import pytest
from confluent_kafka import Producer

from tests.conftest import ROOT, create_topic, read_topic

APP = "tests.apps.enricher"
COUNTRIES = 200
UPDATED = range(20)      # these get a second value
DELETED = "c5"           # then this one is deleted (a None value)
ORDERS = 300             # order i asks for country c<i % 210>: c200..c209 do not exist


def produce(broker: str, topic: str, records: List[Tuple[str, Optional[Dict[str, Any]]]]) -> None:
    """Records from a default ``confluent_kafka.Producer``: its own partitioner
    (librdkafka's consistent_random), no partition given."""
    producer = Producer({"bootstrap.servers": broker})
    for key, value in records:
        producer.produce(topic, None if value is None else json.dumps(value).encode(), key.encode())
    assert producer.flush(30) == 0


def latest() -> Dict[str, Dict[str, Any]]:
    """What the countries topic holds after :func:`produce_countries`, per key."""
    view = {f"c{i}": {"name": f"country {i}", "v": 1} for i in range(COUNTRIES)}
    for i in UPDATED:
        view[f"c{i}"] = {"name": f"country {i}", "v": 2}
    del view[DELETED]
    return view


def produce_countries(broker: str, prefix: str) -> None:
    create_topic(broker, f"{prefix}-countries", 3)
    produce(broker, f"{prefix}-countries",
            [(f"c{i}", {"name": f"country {i}", "v": 1}) for i in range(COUNTRIES)])
    produce(broker, f"{prefix}-countries", [(f"c{i}", {"name": f"country {i}", "v": 2}) for i in UPDATED])
    produce(broker, f"{prefix}-countries", [(DELETED, None)])


def order(n: int, country: str) -> Tuple[str, Dict[str, Any]]:
    return str(n), {"id": n, "country": country}


def outputs(broker: str, prefix: str, count: int, timeout: float = 45) -> Dict[int, Any]:
    """order id → the country its output carries, once ``count`` distinct orders came."""
    def enough(messages: List) -> bool:
        return len({json.loads(m.value())["order"] for m in messages}) >= count

    messages = read_topic(broker, f"{prefix}-out", count, timeout, until=enough)
    got = {json.loads(m.value())["order"]: json.loads(m.value())["country"] for m in messages}
    assert len(got) >= count, f"{len(got)} of {count} outputs within {timeout}s"
    return got


def shardsup_table(datadir: str, prefix: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", "table", "-A", APP, "--datadir",
                           datadir, "countries", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "SHARDSUP_TEST_PREFIX": prefix})


def start_enricher(broker: str, prefix: str, start_supervisor, tmp_path, name: str = "a"):  # type: ignore[no-untyped-def]
    """Countries first, then ``shardsup start -c 2`` whose mirror holds its catch-up until
    the children have their tasks and the orders are in; returns the supervisor and the
    outputs of every order."""
    produce_countries(broker, prefix)
    create_topic(broker, f"{prefix}-orders", 4)
    release = tmp_path / f"release-{name}"
    sup = start_supervisor(APP, "-c", "2", name=name,
                           env={"SHARDSUP_TEST_HOLD_CATCH_UP": str(release)})
    sup.wait_for(lambda: sum(len(t) for t in sup.child_tasks().values()) == 4, 30,
                 "two children with the four tasks")
    produce(broker, f"{prefix}-orders", [order(n, f"c{n % 210}") for n in range(ORDERS)])
    early = read_topic(broker, f"{prefix}-out", 1, timeout=3)
    assert early == [], "an order was processed before the global table caught up"
    release.touch()
    return sup, outputs(broker, prefix, ORDERS)


@pytest.mark.timeout(90)
def test_every_output_carries_the_looked_up_value(broker, prefix, start_supervisor, tmp_path):
    sup, got = start_enricher(broker, prefix, start_supervisor, tmp_path)
    view = latest()
    assert got == {n: view.get(f"c{n % 210}") for n in range(ORDERS)}
    assert got[5] is None and got[7] == {"name": "country 7", "v": 2}   # deleted; updated
    # one copy for the supervisor, read by both children: exactly one LMDB environment
    envs = glob.glob(os.path.join(sup.datadir, "**", "data.mdb"), recursive=True)
    assert envs == [os.path.join(sup.datadir, prefix, "global", "countries", "data.mdb")]
    assert len(sup.child_tasks()) == 2
    assert sup.stop() == 0
    out = sup.output()
    assert out.count("global table(s) countries caught up; processing starts") == 2
    assert "died with code" not in out and "dead-lettered" not in out


@pytest.mark.timeout(90)
def test_the_copy_follows_its_topic_live(broker, prefix, start_supervisor, tmp_path):
    sup, _got = start_enricher(broker, prefix, start_supervisor, tmp_path)
    produce(broker, f"{prefix}-countries", [("c7", {"name": "country 7", "v": 3}), ("c8", None),
                                            ("c300", {"name": "new", "v": 1})])

    def shows_the_update() -> bool:
        result = shardsup_table(sup.datadir, prefix, "c7")
        return result.returncode == 0 and json.loads(result.stdout)["v"] == 3

    sup.wait_for(shows_the_update, 30, "`shardsup table countries c7` to show the update")
    assert shardsup_table(sup.datadir, prefix, "c8").returncode != 0, "c8 was deleted"
    produce(broker, f"{prefix}-orders", [order(1000, "c7"), order(1001, "c8"), order(1002, "c300")])
    got = outputs(broker, prefix, ORDERS + 3)
    assert got[1000] == {"name": "country 7", "v": 3}
    assert got[1001] is None
    assert got[1002] == {"name": "new", "v": 1}
    assert sup.stop() == 0


@pytest.mark.timeout(90)
def test_the_table_command_shows_the_copy_and_a_restart_resumes_it(broker, prefix,
                                                                   start_supervisor, tmp_path):
    sup, _got = start_enricher(broker, prefix, start_supervisor, tmp_path)
    result = shardsup_table(sup.datadir, prefix)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == latest()
    one = shardsup_table(sup.datadir, prefix, "c0")
    assert one.returncode == 0 and json.loads(one.stdout) == {"name": "country 0", "v": 2}
    missing = shardsup_table(sup.datadir, prefix, DELETED)
    assert missing.returncode != 0 and f"has no key '{DELETED}'" in missing.stderr
    assert sup.stop() == 0
    # a restart goes on from the offsets stored with the copy: nothing is read again
    again = start_supervisor(APP, "-c", "2", name="a")
    again.wait_for(lambda: "caught up with topic" in again.output(), 30, "the catch-up")
    assert f"{prefix}-countries (0 records in" in again.output()
    assert "mirroring topic" in again.output() and "(from the beginning)" not in again.output()
    assert again.stop() == 0
    assert json.loads(shardsup_table(sup.datadir, prefix).stdout) == latest()
