"""Oversize records (issue 11, point 6): an output or a dead letter larger than the
producers' ``message.max.bytes`` goes to the dead-letter topic (a dead letter that is
itself too large: truncated), and the task goes on: no crash, no crash loop."""
from __future__ import annotations

import json

import pytest

from tests.conftest import produce, read_to_end, read_topic

N = 200
TOO_BIG_OUTPUT = 50      # yields an output of just over message.max.bytes (10,000)
TOO_BIG_LETTER = 120     # raises on a 15,000-byte input: its dead letter is too large
TOO_BIG_STATE = 160      # writes a table value whose changelog record is too large
BOOM_FILLER = 15_000


def inputs():
    for n in range(N):
        if n == TOO_BIG_OUTPUT:
            value = {"n": n, "pad": 10_000}
        elif n == TOO_BIG_LETTER:
            value = {"n": n, "boom": True, "filler": "y" * BOOM_FILLER}
        elif n == TOO_BIG_STATE:
            value = {"n": n, "state": 10_000}
        else:
            value = {"n": n}
        yield (f"k{n}".encode(), json.dumps(value).encode(), n % 2)


def headers_of(msg):
    return {name: value for name, value in msg.headers() or ()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_oversize_outputs_and_dead_letters_are_dead_lettered(broker, prefix, start_supervisor,
                                                             guarantee):
    sup = start_supervisor("tests.apps.big_outputs", "-c", "1",
                           env={"SHARDSUP_TEST_GUARANTEE": guarantee})
    sup.wait_for(lambda: len(sup.child_tasks()) == 1, 30, "one child")
    produce(broker, f"{prefix}-in", list(inputs()))
    dead = read_topic(broker, f"{prefix}-pad-dlq", 3, timeout=60)
    assert len(dead) == 3, sup.output()[-3000:]
    # a truncated dead letter is no JSON any more: it says so in a header
    letters = {TOO_BIG_LETTER if "shardsup.truncated" in headers_of(m) else json.loads(m.value())["n"]: m
               for m in dead}
    # the record whose output was too large, whole, with the reason in its headers
    big_output = headers_of(letters[TOO_BIG_OUTPUT])
    assert big_output["shardsup.error"].startswith(b"RecordTooLarge")
    assert b"message.max.bytes" in big_output["shardsup.error"]
    assert big_output["shardsup.partition"] == str(TOO_BIG_OUTPUT % 2).encode()
    # the record whose table value would not fit in a changelog record
    big_state = headers_of(letters[TOO_BIG_STATE])
    assert big_state["shardsup.error"].startswith(b"RecordTooLarge")
    assert f"{prefix}-seen-changelog".encode() in big_state["shardsup.error"]
    # the dead letter too large itself: payload truncated, headers kept
    letter = letters[TOO_BIG_LETTER]
    headers = headers_of(letter)
    assert headers["shardsup.error"] == f"ValueError: boom on n={TOO_BIG_LETTER}".encode()
    original = len(json.dumps({"n": TOO_BIG_LETTER, "boom": True, "filler": "y" * BOOM_FILLER}))
    assert int(headers["shardsup.truncated"]) == original
    assert 0 < len(letter.value()) < original
    # every other record's output arrived, and the child never died
    outputs = read_topic(broker, f"{prefix}-out", N - 3, timeout=60)
    seen = {json.loads(m.value())["n"] for m in outputs}
    assert seen == set(range(N)) - {TOO_BIG_OUTPUT, TOO_BIG_LETTER, TOO_BIG_STATE}
    # the table holds every other record's write, and not the one too large
    changelog = {m.key(): m.value() for m in read_to_end(broker, f"{prefix}-seen-changelog")}
    assert f'"{TOO_BIG_STATE}"'.encode() not in changelog
    assert f'"{TOO_BIG_STATE + 1}"'.encode() in changelog
    assert "died with code" not in sup.output()
    assert "FAILED" not in sup.output()
    assert sup.stop() == 0
