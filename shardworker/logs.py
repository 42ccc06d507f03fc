"""One log format for every process, with its role in each line."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

FORMAT = "%(asctime)s %(levelname)-7s [%(role)s] %(message)s"


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


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
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def setup_logging(role: str, level: str = "info", fmt: str = "text") -> None:
    """Logs to stderr, one write per line, so children's lines never interleave mid-line."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
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
