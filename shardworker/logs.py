"""One log format for every process, with its role in each line."""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s [%(role)s] %(message)s"


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


def setup_logging(role: str, level: str = "info") -> None:
    """Logs to stderr (line by line, so children's lines never interleave mid-line)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
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
