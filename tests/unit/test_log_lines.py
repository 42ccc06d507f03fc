"""Text inside a log record cannot forge a log line (issue 11, point 11; moved here from
tests/integration/test_private_files.py: it needs no broker and no process)."""
from __future__ import annotations

import logging
import re
import sys

from shardworker.logs import CONTINUATION, TextFormatter

REAL_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def test_text_in_a_log_record_cannot_forge_a_log_line() -> None:
    forged = "boom\n2026-12-01 11:00:00,000 INFO    [supervisor] all is fine\rERROR x\x1b[2J\u2028y"
    record = logging.LogRecord("shardworker.worker", logging.ERROR, __file__, 1,
                               "agent failed: %s", (forged,), None)
    record.role = "child 0_0"
    try:
        raise ValueError(forged)
    except ValueError:
        record.exc_info = sys.exc_info()
    text = TextFormatter().format(record)
    lines = text.split("\n")
    assert REAL_LINE.match(lines[0]) and lines[0].endswith("agent failed: boom")
    assert len(lines) > 3
    for line in lines[1:]:
        assert line.startswith(CONTINUATION) and not REAL_LINE.match(line), line
    assert "Traceback (most recent call last):" in text
    assert "\r" not in text and "\x1b" not in text and "\u2028" not in text
    assert "\\x0dERROR x\\x1b[2J\\u2028y" in text
    assert text.splitlines() == lines  # no other character splits a line for any reader
