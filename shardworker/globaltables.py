"""Global tables: a read-only dict over a whole topic (the last value per key; a ``None``
value deletes), of which every task can read any key (``app.global_table(...)``).

One copy per supervisor, not one per child (DESIGN.md, "Global tables"): the supervisor's
mirror (:mod:`supervisor.globalmirror`) writes it into one LMDB environment at
``<datadir>/<app id>/global/<name>/`` and the children open that environment read-only.
This module holds what both sides share: the declaration (:class:`GlobalTable`), the
layout (:func:`global_dir`, :data:`META_CAUGHT_UP`), and the child's side, the
:class:`CatchUpGate` that holds its records back until every copy has caught up.

The environment is a :class:`~shardworker.store.TaskStore` with one table database (the
table's name: key bytes → value bytes exactly as they are in the topic) and the usual
metadata: ``input/<topic>/<partition>`` is the next offset of the topic to mirror, written
in the same transaction as the data; ``identity`` the cluster and topic; and
:data:`META_CAUGHT_UP`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

from .store import TaskStore

log = logging.getLogger("shardworker.globaltables")

__all__ = ["GlobalTable", "GlobalTableError", "ReadOnlyTableError", "CatchUpGate",
           "global_dir", "open_copy", "caught_up_info", "META_CAUGHT_UP"]

#: metadata key of a copy that has caught up with its topic in this supervisor's run:
#: JSON ``{"ends": {"<partition>": <next offset reached>}}``.  The mirror deletes it when it
#: starts and writes it, in the same transaction as the records that completed the
#: catch-up, once every partition reached the end it had when the mirror started.
META_CAUGHT_UP = "global/caught_up"
#: a child waiting for a copy says so in its log this often (seconds)
WAIT_LOG_EVERY = 10.0


class GlobalTableError(RuntimeError):
    """A global table used where it cannot be (not open in this process, say)."""


class ReadOnlyTableError(TypeError):
    """A write to a global table: only its topic writes it."""


def global_dir(datadir: str, app_id: str, name: str) -> str:
    """``<datadir>/<app id>/global/<name>``: the one LMDB environment of a global table."""
    return os.path.join(datadir, app_id, "global", name)


def open_copy(path: str, name: str) -> TaskStore:
    """Opens the copy at ``path`` for reading from a process other than the mirror's (a
    child, ``shardsup table``): LMDB's lock file registers the reader, so the writer never
    recycles pages it reads, and each read transaction sees the newest commit."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise FileNotFoundError(f"no global table copy at {path}")
    return TaskStore(path, [name], map_size=0, readonly=True, exclusive=False)


def caught_up_info(store: TaskStore) -> Optional[Dict[str, Any]]:
    """The :data:`META_CAUGHT_UP` record of a copy, or None while it is catching up."""
    raw = store.get_meta(META_CAUGHT_UP)
    return None if raw is None else json.loads(raw)


_MISSING = object()


class GlobalTable:
    """A read-only dict over every key of ``topic`` (Faust's ``GlobalTable``): ``t[k]``
    (missing: ``default()`` when a default is given, else KeyError), ``t.get(k, d)``,
    ``k in t``, ``len(t)``, ``keys()``, ``values()``, ``items()``.  Keys are encoded with
    the topic's key serializer for the lookup, values decoded with its value serializer.

    Readable in the children of ``shardsup start`` (any agent, any task, timers), which
    open the supervisor's copy; every lookup is a fresh LMDB read transaction, so it sees
    the newest record the mirror committed.  Writes raise :class:`ReadOnlyTableError`:
    produce to the topic instead.
    """

    def __init__(self, name: str, topic: Any, default: Optional[Callable[[], Any]] = None) -> None:
        if not name or name.startswith("__") or "/" in name:
            raise ValueError(f"bad global table name {name!r}: it must be non-empty, contain "
                             "no '/' and not start with '__'")
        self.name = name
        self.topic = topic
        self.default = default
        self._store: Optional[TaskStore] = None

    def __repr__(self) -> str:
        return f"<GlobalTable {self.name} of {self.topic.name}>"

    # -- the copy this process reads ----------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._store is not None

    def attach(self, store: TaskStore) -> None:
        """Reads from ``store`` from now on (the child's :class:`CatchUpGate` does it)."""
        self._store = store

    def detach(self) -> None:
        """Closes the copy this process reads."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def _copy(self) -> TaskStore:
        if self._store is None:
            raise GlobalTableError(
                f"global table {self.name!r} is not open in this process: it is read by the "
                "agents and timers of `shardsup start` (or with `shardsup table`)")
        return self._store

    def _encode(self, key: Any) -> Optional[bytes]:
        return self.topic.encode_key(key)

    # -- reads --------------------------------------------------------------------------
    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when the topic has none."""
        raw = self._raw(key)
        return default if raw is None else self.topic.decode_value(raw)

    def _raw(self, key: Any) -> Optional[bytes]:
        encoded = self._encode(key)
        if encoded is None:
            return None  # a record without a key is not in the table
        return self._copy().get(self.name, encoded)

    def __getitem__(self, key: Any) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            if self.default is not None:
                return self.default()
            raise KeyError(key)
        return value

    def __contains__(self, key: Any) -> bool:
        return self._raw(key) is not None

    def __len__(self) -> int:
        return self._copy().count(self.name)

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    def keys(self) -> Iterator[Any]:
        """Every key, in the order of their encoded bytes."""
        for key, _value in self._copy().items(self.name):
            yield self.topic.decode_key(key)

    def values(self) -> Iterator[Any]:
        for _key, value in self._copy().items(self.name):
            yield self.topic.decode_value(value)

    def items(self) -> Iterator[Tuple[Any, Any]]:
        """Every (key, value); read in chunks of committed snapshots (a long iteration
        may see some of the records the mirror writes meanwhile)."""
        for key, value in self._copy().items(self.name):
            yield self.topic.decode_key(key), self.topic.decode_value(value)

    # -- writes: refused ----------------------------------------------------------------
    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise ReadOnlyTableError(
            f"global table {self.name!r} is read-only: it mirrors topic {self.topic.name!r}; "
            "produce to that topic to change it")

    __setitem__ = __delitem__ = pop = setdefault = update = clear = popitem = _read_only


class CatchUpGate:
    """A child's wait for the global tables (DESIGN.md, "Global tables"): no record is
    processed before every copy has caught up with its topic, as far as the topic went
    when the supervisor started.  :meth:`wait` answers at once when the app has none."""

    def __init__(self, tables: Sequence[GlobalTable], datadir: str, app_id: str) -> None:
        self.tables = list(tables)
        self.datadir = datadir
        self.app_id = app_id
        self.ready = not self.tables
        self._stores: Dict[str, TaskStore] = {}
        self._began = time.monotonic()
        self._last_log = self._began

    def wait(self, timeout: float) -> bool:
        """True once every copy has caught up (then each table reads its copy); else
        waits up to ``timeout`` seconds for it and answers False."""
        if self.ready:
            return True
        deadline = time.monotonic() + timeout
        while not self._check():
            now = time.monotonic()
            if now - self._last_log >= WAIT_LOG_EVERY:
                self._last_log = now
                log.info("waiting %.0fs so far for global table(s) %s to catch up with their "
                         "topics (the supervisor's mirror)", now - self._began,
                         ", ".join(t.name for t in self.tables if not t.is_open))
            if now >= deadline:
                return False
            time.sleep(min(0.05, deadline - now))
        self.ready = True
        log.info("global table(s) %s caught up; processing starts",
                 ", ".join(t.name for t in self.tables))
        return True

    def _check(self) -> bool:
        for table in self.tables:
            if table.is_open:
                continue
            store = self._stores.get(table.name)
            if store is None:
                try:
                    store = open_copy(global_dir(self.datadir, self.app_id, table.name), table.name)
                except FileNotFoundError:
                    return False  # the mirror has not created it yet
                self._stores[table.name] = store
            if caught_up_info(store) is None:
                return False
            table.attach(self._stores.pop(table.name))
        return True

    def close(self) -> None:
        """Closes the copies this process opened."""
        for store in self._stores.values():
            store.close()
        self._stores.clear()
        for table in self.tables:
            table.detach()


def declared_topic(app: Any, name: str, topic: Any) -> Any:
    """The app's declaration of ``topic`` (a :class:`~shardworker.app.Topic` or a name)
    for global table ``name``, or a one-line error when the app does not declare it."""
    topic_name = topic if isinstance(topic, str) else getattr(topic, "name", None)
    declared = app.topics.get(topic_name) if topic_name is not None else None
    if declared is None or (not isinstance(topic, str) and declared is not topic):
        raise ValueError(f"global table {name!r}: topic {topic_name or topic!r} is not declared "
                         f"by app {app.id!r}; pass app.topic({topic_name or '...'!r}, ...)")
    other = next((t for t in app.global_tables if t.topic is declared), None)
    if other is not None:
        raise ValueError(f"global table {name!r}: topic {topic_name!r} is mirrored by global "
                         f"table {other.name!r} already; read that one")
    return declared


def check_new_name(app: Any, name: str) -> None:
    """One name per table, task table or global: ``shardsup table NAME`` shows either."""
    if any(t.name == name for t in app.tables) or any(t.name == name for t in app.global_tables):
        raise ValueError(f"two tables named {name!r}")

