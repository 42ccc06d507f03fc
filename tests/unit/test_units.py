"""Unit tests of pure logic: placement, topology, codecs, framing, app loading."""
from __future__ import annotations

import json
import socket

import pytest

import shardworker
from shardworker.app import bootstrap_servers
from shardworker.codecs import get_codec
from shardworker.loader import AppNotFound, load_app
from shardworker.protocol import Channel, ChannelClosed, Offsets
from shardworker.topology import Topology, task_sort_key
from supervisor.placement import place_tasks

pytestmark = pytest.mark.timeout(10)


def test_first_assignment_spreads_tasks_over_the_cap():
    existing, new = place_tasks([f"0_{p}" for p in range(8)], {}, 2)
    assert existing == {}
    assert new == [["0_0", "0_2", "0_4", "0_6"], ["0_1", "0_3", "0_5", "0_7"]]


def test_fewer_tasks_than_cap_starts_one_child_per_task():
    existing, new = place_tasks(["0_1", "0_0"], {}, 8)
    assert new == [["0_0"], ["0_1"]]


def test_new_tasks_go_to_least_loaded_children_and_running_tasks_stay():
    existing, new = place_tasks(["0_4", "0_5"], {0: ["0_0", "0_1"], 1: ["0_2"]}, 2)
    assert new == []
    assert existing == {1: ["0_4"], 0: ["0_5"]} or existing == {1: ["0_4", "0_5"]}
    assert sum(len(v) for v in existing.values()) == 2


def test_cap_reached_later_starts_the_missing_children():
    existing, new = place_tasks(["0_2", "0_3"], {0: ["0_0", "0_1"]}, 3)
    assert existing == {} and sorted(map(tuple, new)) == [("0_2",), ("0_3",)]


def test_task_ids_follow_source_topic_order():
    sources = ["orders", "clicks"]
    assert Topology.of_sources(sources).group_by_task([("clicks", 3), ("orders", 0), ("other", 1)]) == {
        "1_3": [("clicks", 3)], "0_0": [("orders", 0)]}
    assert Topology.of_sources(sources).task_partitions("1_3") == [("clicks", 3)]
    assert sorted(["0_10", "0_2", "1_0"], key=task_sort_key) == ["0_2", "0_10", "1_0"]


@pytest.mark.parametrize("name,value", [("json", {"a": [1, "é"]}), ("str", "héllo"), ("raw", b"\x00\x01")])
def test_codecs_round_trip(name, value):
    encode, decode = get_codec(name)
    assert decode(encode(value)) == value
    assert encode(None) is None and decode(None) is None


@pytest.mark.parametrize("value", [0, -7, 2**70, True, False, 1.5, "u1", "é\"\n\u2028\\",
                                   "", [1, "a"], {"a": {"b": None}}])
def test_json_fast_paths_write_what_json_dumps_writes(value):
    encode, decode = get_codec("json")
    assert encode(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert decode(encode(value)) == value and type(decode(encode(value))) is type(value)


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown serializer 'yaml'"):
        get_codec("yaml")


def test_channel_frames_survive_partial_reads():
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    for n in range(100):
        left.send(Offsets([["t", n, n * 10]]))
    got = []
    while len(got) < 100:
        got.extend(right.receive())
    assert [m.offsets[0][1] for m in got] == list(range(100))
    left.close()
    with pytest.raises(ChannelClosed):
        right.receive()


def test_bootstrap_servers_from_urls():
    assert bootstrap_servers("kafka://a:1;b:2") == "a:1,b:2"
    assert bootstrap_servers("127.0.0.1:9092") == "127.0.0.1:9092"


def test_producers_wait_producer_linger_ms_to_fill_a_batch_and_kafka_config_wins():
    assert shardworker.App("a").producer_config("h:1")["linger.ms"] == 50
    assert shardworker.App("a", producer_linger_ms=0).producer_config("h:1")["linger.ms"] == 0
    own = shardworker.App("a", producer_linger_ms=0, kafka_config={"linger.ms": 7})
    config = own.producer_config("h:1")
    assert config["linger.ms"] == 7 and config["partitioner"] == "murmur2_random"
    for bad in (-1, 1.5, "50", True, 900_001):
        with pytest.raises(ValueError, match="producer_linger_ms"):
            shardworker.App("a", producer_linger_ms=bad)


def test_load_app_by_module_and_attribute(monkeypatch):
    monkeypatch.setenv("SHARDSUP_TEST_PREFIX", "unit")
    app = load_app("tests.apps.doubler")
    assert isinstance(app, shardworker.App) and app.id == "unit"
    assert load_app("tests.apps.doubler:app") is app
    with pytest.raises(AppNotFound, match="defines no shardworker.App"):
        load_app("tests.apps.no_app")


def test_app_rejects_unknown_settings_and_policies():
    with pytest.raises(TypeError, match="unknown App setting"):
        shardworker.App("x", sesion_timeout_ms=1)
    app = shardworker.App("x")
    topic = app.topic("in")
    with pytest.raises(ValueError, match="on_error"):
        app.agent(topic, on_error="ignore")
