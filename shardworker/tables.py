"""Tables: Faust-like dicts over the current task's LMDB state (``app.table(...)``), the
API an agent touches.  Windowed tables (``table.tumbling(size)``,
``table.hopping(size, step)``) are views over a table: :mod:`shardworker.windows`.

Where the rest lives (DESIGN.md, "State (LMDB)"):

* :mod:`shardworker.tablecontext`: the record being processed (:data:`CONTEXT`), whose
  task's tables a table reads and writes;
* :mod:`shardworker.tasktables`: the tables of one task as the worker drives them (the
  write cache, the skip rule, drained batches and their commit);
* :mod:`shardworker.batchend`: a task's batch end (the write cache drained into
  changelog records, the windows closed and expired);
* :mod:`shardworker.changelog`: the changelog record format (headers) and producing a
  batch's records;
* :mod:`shardworker.restore`: restoring a task from its changelogs;
* :mod:`shardworker.state`: the task states of a child (open, drain, commit, close);
* :mod:`shardworker.store`: the LMDB store of one task (its layout on disk).

Assigning ``None`` deletes the key (serializers map None to no value: a tombstone).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from .codecs import Serializer, encodes_small_ints, get_codec, roundtrip_types
from .tablecontext import (CONTEXT, MISSING, SMALL_INT_MAX, SMALL_INT_MIN, UNENCODED,
                           NoCurrentRecordError, TableContext, TableError)
from .tasktables import TaskTables
from .windows import Seconds, Window, WindowedTable

__all__ = ["Table", "WindowedTable", "Window", "CONTEXT", "TableContext", "TableError",
           "NoCurrentRecordError"]

#: key types whose serialized form depends on the value alone (bool is not int here)
_MEMO_KEY_TYPES = (str, int)
#: serialized keys a table remembers before it starts over
KEY_MEMO_SIZE = 100_000


class Table:
    """A dict-like table over the CURRENT task's partition of the data (Faust's
    ``app.Table``).  Keys and values are serialized with ``key_serializer`` and
    ``value_serializer`` (``json`` by default, also ``raw``, ``str`` or any registered codec).

    * ``t[k]`` (missing: ``default()`` when a default is given, else KeyError; the
      default is NOT stored until assigned, so ``t[k] += 1`` with ``default=int`` works),
      ``t[k] = v`` (None deletes), ``del t[k]``, ``k in t``, ``t.get(k, d)``,
      ``t.pop(k[, d])``, ``t.setdefault(k, d)``, ``t.update(...)``, ``len(t)``,
      ``t.keys() / values() / items()`` (the task's stored keys with this batch's
      changes; iteration order: stored keys first, then new ones).
    * The changelog topic is ``f"{app_id}-{name}-changelog"``: pass ``app_id=`` or call
      :meth:`attach` (the App does it when the table is declared on it).
    * Use it only inside an agent, while a record is processed: the partition a table
      operation works on is that record's task's.
    """

    def __init__(self, name: str, default: Optional[Callable[[], Any]] = None,
                 key_serializer: Serializer = "json", value_serializer: Serializer = "json", *,
                 app_id: Optional[str] = None, context: Optional[TableContext] = None,
                 help: str = "") -> None:
        if not name or name.startswith("__") or "/" in name:
            raise ValueError(f"bad table name {name!r}")
        self.name = name
        self.default = default
        self.key_serializer = key_serializer
        self.value_serializer = value_serializer
        # topic None: a table's stored bytes (json: the exact encoder, codecs.JsonCodec)
        self._encode_key, self._decode_key = get_codec(key_serializer, None, "key")
        self._encode_value, self._decode_value = get_codec(value_serializer, None, "value")
        #: types whose values decode back to an equal object of the same type: the write
        #: cache hands them back without a decode
        self._roundtrip = roundtrip_types(value_serializer)
        #: ints of 64 bits are encoded at the drain, not at each write (TaskTables.write)
        self._defers_ints = encodes_small_ints(value_serializer)
        #: serialized keys of recent str/int keys: a hot key is encoded once, not per access
        self._key_memo: Dict[Any, bytes] = {}
        self.app_id = app_id
        self.help = help
        self._context = context or CONTEXT
        #: the window, once :meth:`tumbling` or :meth:`hopping` made this table windowed
        self.window: Optional[Window] = None
        #: a windowed table's ``on_close`` (:mod:`shardworker.windowclose`), if any
        self.closer: Optional[Any] = None
        #: what a record for a closed window does besides being dropped: "drop", "dlq"
        self.on_late = "drop"
        #: records found late for this table in this process (every task together)
        self.late_count = 0

    def __repr__(self) -> str:
        kind = f" {self.window}" if self.window else ""
        return f"<Table {self.name}{kind}>"

    def attach(self, app_id: str) -> "Table":
        """Names the app the table belongs to (its changelog topic's prefix)."""
        self.app_id = app_id
        return self

    @property
    def changelog_topic(self) -> str:
        """``<app id>-<table name>-changelog``: compacted, partition = task partition."""
        if self.app_id is None:
            raise TableError(f"table {self.name} belongs to no app yet (Table(app_id=...) or "
                             "table.attach(app_id))")
        return f"{self.app_id}-{self.name}-changelog"

    # -- windowing --------------------------------------------------------------------
    def tumbling(self, size: Seconds, expires: Optional[Seconds] = None, *,
                 grace: Optional[Seconds] = None, on_late: str = "drop") -> "WindowedTable":
        """Windowed view with tumbling windows of ``size`` seconds (epoch-aligned).  A
        window closes when the task's stream time reaches its end + ``grace`` (None:
        when it expires); a record for a closed window is late: counted and dropped,
        with ``on_late="dlq"`` also dead-lettered.  DESIGN.md, "Windows and time"."""
        return self._windowed(Window(size, size, expires, grace), on_late)

    def hopping(self, size: Seconds, step: Seconds, expires: Optional[Seconds] = None, *,
                grace: Optional[Seconds] = None, on_late: str = "drop") -> "WindowedTable":
        """Windowed view with windows of ``size`` seconds every ``step`` seconds
        (``grace`` and ``on_late``: as :meth:`tumbling`)."""
        return self._windowed(Window(size, step, expires, grace), on_late)

    def session(self, gap: Seconds, *, grace: Seconds = 0, expires: Optional[Seconds] = None,
                merge: Optional[Callable[[Any, Any], Any]] = None,
                on_late: str = "drop") -> Any:
        """Session windows: a key's records less than ``gap`` seconds apart form one
        session; a record bridging two merges them (values combined by ``merge(a, b)``,
        default the sum of numbers).  :class:`~shardworker.sessions.SessionTable`;
        DESIGN.md, "Windows and time"."""
        from .sessions import SessionTable, SessionWindows

        window = SessionWindows(gap, grace, expires, merge)
        self._windowed(window, on_late)  # type: ignore[arg-type]
        return SessionTable(self, window)

    def sliding(self, size: Seconds, *, grace: Seconds = 0,
                merge: Optional[Callable[[Any, Any], Any]] = None,
                on_late: str = "drop") -> Any:
        """Sliding windows: one window ``[t - size, t]`` per record time ``t`` of a key,
        holding the key's records in it (combined by ``merge``, default the sum).
        :class:`~shardworker.sliding.SlidingTable`; DESIGN.md, "Windows and time"."""
        from .sliding import SlidingTable, SlidingWindows

        window = SlidingWindows(size, grace, merge)
        self._windowed(window, on_late)  # type: ignore[arg-type]
        return SlidingTable(self, window)

    def _windowed(self, window: "Window", on_late: str = "drop") -> "WindowedTable":
        from .windowclose import LATE_POLICIES

        if self.window is not None:
            raise TableError(f"table {self.name} is windowed already ({self.window})")
        if on_late not in LATE_POLICIES:
            raise ValueError(f"on_late must be one of {LATE_POLICIES}, not {on_late!r}")
        self.window = window
        self.on_late = on_late
        return WindowedTable(self, window)

    # -- internals --------------------------------------------------------------------
    def _plain(self) -> Tuple[TableContext, TaskTables]:
        """The context and the current record's task (raises outside a record, or for a
        windowed table).  The mapping methods below inline its common case."""
        if self.window is not None:
            raise TableError(f"table {self.name} is windowed: use the object that "
                             "tumbling()/hopping() returned")
        ctx = self._context
        return ctx, ctx.current_task()

    def _read(self, task: TaskTables, kb: bytes) -> Any:
        value, raw = task.read_raw(self.name, kb)
        if raw is None:
            return MISSING
        if value is not MISSING and type(value) in self._roundtrip:
            return value
        return self._decode_value(raw)

    def _key_bytes(self, key: Any) -> bytes:
        memoable = type(key) in _MEMO_KEY_TYPES
        if memoable:
            kb = self._key_memo.get(key)
            if kb is not None:
                return kb
        kb = self._encode_key(key)
        if kb is None:
            raise TableError(f"table {self.name}: None is not a table key")
        if memoable:
            if len(self._key_memo) >= KEY_MEMO_SIZE:
                self._key_memo.clear()
            self._key_memo[key] = kb
        return kb

    # -- the mapping ------------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        task = self._context.task
        if task is None or self.window is not None:
            _ctx, task = self._plain()
        kb = self._key_memo.get(key) if type(key) is str else None  # _key_bytes' common case
        if kb is None:
            kb = self._key_bytes(key)
        # _read and the write cache's part of TaskTables.read_raw, inline: this runs for
        # every read of every record
        entry = task.cache[self.name].get(kb)
        if entry is not None:
            value, raw = entry[0], entry[1]
            if raw is UNENCODED:  # an int, handed back as it is (UNENCODED's rule)
                return value
        else:
            value, raw = task.read_behind_cache(self.name, kb)
        if raw is not None:
            if value is MISSING or type(value) not in self._roundtrip:
                return self._decode_value(raw)
            return value
        if self.default is not None:
            return self.default()
        raise KeyError(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        ctx = self._context
        task = ctx.task
        if task is None or self.window is not None:
            ctx, task = self._plain()
        kb = self._key_memo.get(key) if type(key) is str else None  # _key_bytes' common case
        if kb is None:
            kb = self._key_bytes(key)
        cache = task.cache[self.name]
        before = cache.get(kb)
        if (before is not None and before[1] is UNENCODED and ctx.writable
                and type(value) is int and SMALL_INT_MIN <= value <= SMALL_INT_MAX):
            # a counter's step, inline (the call to TaskTables.write would cost more than
            # its work): a small int over one the batch wrote already (the key checked
            # then), encoded at the drain like it
            task.undo.setdefault((self.name, kb), before)
            cache[kb] = (value, UNENCODED, ctx.source)  # type: ignore[assignment]
        else:
            task.write(self, kb, key, value, ctx)

    def __delitem__(self, key: Any) -> None:
        ctx, task = self._plain()
        kb = self._key_bytes(key)
        if self._read(task, kb) is MISSING:
            raise KeyError(key)
        task.write(self, kb, key, None, ctx)

    def __contains__(self, key: Any) -> bool:
        _ctx, task = self._plain()
        return self._read(task, self._key_bytes(key)) is not MISSING

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` (not the table's default factory)."""
        _ctx, task = self._plain()
        value = self._read(task, self._key_bytes(key))
        return default if value is MISSING else value

    def pop(self, key: Any, *default: Any) -> Any:
        """Removes ``key`` and returns its value (or ``default``; KeyError without)."""
        ctx, task = self._plain()
        kb = self._key_bytes(key)
        value = self._read(task, kb)
        if value is MISSING:
            if default:
                return default[0]
            raise KeyError(key)
        task.write(self, kb, key, None, ctx)
        return value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        value = self.get(key, MISSING)
        if value is MISSING:
            self[key] = default
            return default
        return value

    def update(self, other: Any = (), **kwargs: Any) -> None:
        items = other.items() if hasattr(other, "items") else other
        for key, value in items:
            self[key] = value
        for key, value in kwargs.items():
            self[key] = value

    def items(self) -> Iterator[Tuple[Any, Any]]:
        """(key, value) pairs of the current task's partition, this batch included."""
        _ctx, task = self._plain()
        decode_key, decode_value = self._decode_key, self._decode_value
        for kb, raw in task.iter_raw(self.name):
            yield decode_key(kb), decode_value(raw)

    def keys(self) -> Iterator[Any]:
        for key, _value in self.items():
            yield key

    def values(self) -> Iterator[Any]:
        for _key, value in self.items():
            yield value

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    def __len__(self) -> int:
        return sum(1 for _ in self.items())
