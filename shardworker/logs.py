"""One log format for every process, with its role in each line."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

FORMAT = "%(asctime)s %(levelname)-7s [%(role)s] %(message)s"
#: what starts every line of a record after its first (message continuation, traceback)
CONTINUATION = "  | "
#: characters that end a line for some reader (Python's splitlines, terminals) other
#: than "\n" itself, and the C0 controls: shown escaped, never written raw
_UNSAFE = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f, 0x85]}
_UNSAFE.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


def escape_line(text: str) -> str:
    """``text`` (one line) with carriage returns and other control characters escaped."""
    return text.translate(_UNSAFE)


class TextFormatter(logging.Formatter):
    """The text format, safe against forged lines: a record's first line is written as
    is; every further line (a message with newlines in it, such as exception text from
    user code or a broker, or the traceback block) starts with :data:`CONTINUATION`, so
    no text inside a record can produce a line that starts like a real log line.  Other
    control characters (``\\r`` above all) are escaped."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        first, *rest = super().format(record).split("\n")
        return "\n".join([escape_line(first)] + [CONTINUATION + escape_line(line) for line in rest])


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                 "role": getattr(record, "role", "?"), "pid": record.process,
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def redirect_output(logfile: str) -> None:
    """Points this process's stdout and stderr (inherited by its children) at ``logfile``,
    opened for appending: every process writes whole lines with single writes there."""
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def open_private(path: str, flags: int) -> int:
    """Opens a file the supervisor or a child owns under the datadir: created 0600, and
    never through a symbolic link planted in its place (``O_NOFOLLOW``: ELOOP instead)."""
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def setup_logging(role: str, level: str = "info", fmt: str = "text") -> None:
    """Logs to stderr, one write per line, so children's lines never interleave mid-line."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RoleFilter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    set_role(role)


def set_role(role: str) -> None:
    """Changes the ``[role]`` shown in this process's lines (a child's tasks change)."""
    for handler in logging.getLogger().handlers:
        for flt in handler.filters:
            if isinstance(flt, _RoleFilter):
                flt.role = role
