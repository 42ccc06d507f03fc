"""One task's state on disk: an LMDB environment with a named database per table and one
for metadata, where state and the offsets it reflects commit in ONE write transaction.

Layout: ``<datadir>/<app>/tasks/<task_id>/`` (the caller picks the path) holds LMDB's
``data.mdb`` and ``lock.mdb`` plus ``owner.lock``, an ``flock`` that only the process
working on the task holds (a second writer gets :class:`StoreBusyError`, never a shared
environment).  Databases:

* one named database per table: key bytes → value bytes, exactly as the table's
  serializers (and, for windowed tables, the window key layout) produce them;
* ``__meta__``: the metadata, with these keys (all ASCII):

  ========================================  =============================================
  ``input/<topic>/<partition>``             next input offset to read: offset of the last
                                            record whose effects are in the state, plus 1
  ``changelog/<table>``                     offset of the last changelog record written
                                            for the table (its partition = the task's)
  ``identity``                              JSON ``{"cluster_id": ..., "source": ...}``
  ``format``                                JSON int, the layout version (1)
  ``latest_timestamp_ms``                   the task's stream time (epoch ms, ``">q"``):
                                            :data:`META_LATEST_TIMESTAMP`
  anything else                             free for callers (:meth:`set_meta`)
  ========================================  =============================================

  Offsets are 8-byte big-endian signed ints (``struct ">q"``): fixed width, cheap, and
  readable by any tool.  Kafka topic names cannot contain ``/``, so the keys are
  unambiguous.

Writes: :meth:`TaskStore.commit` applies a batch's puts and deletes and its offsets in a
single write transaction, so a crash leaves either all of a batch or none of it.  A full
map (``MapFullError``) aborts that transaction, doubles the map and retries: never a crash.

Reads: :meth:`get` and :meth:`items` use short read transactions (``items`` reads in
chunks, so no reader pins old pages or blocks a map resize).  Other processes (the
``shardsup table`` CLI) read a running worker's files through :func:`open_readonly`:
LMDB readers never block the writer and always see a committed snapshot.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import lmdb

from .origins import META_ORIGIN_PREFIX

__all__ = ["TaskStore", "StoreBusyError", "open_readonly", "META_DB", "DEFAULT_MAP_SIZE",
           "META_LATEST_TIMESTAMP", "stream_time_meta"]

META_DB = "__meta__"
#: metadata key under which a task keeps its stream time: the latest record timestamp it
#: saw (">q" epoch ms; DESIGN.md, "State (LMDB)", "Stream time")
META_LATEST_TIMESTAMP = "latest_timestamp_ms"
DEFAULT_MAP_SIZE = 64 * 1024 * 1024
FORMAT_VERSION = 1
#: items() reads this many entries per read transaction
_ITEMS_CHUNK = 1000
_OFFSET = struct.Struct(">q")
_INPUT_PREFIX = b"input/"
_CHANGELOG_PREFIX = b"changelog/"
_IDENTITY = b"identity"
_FORMAT = b"format"

WriteSet = Mapping[str, Mapping[bytes, Optional[bytes]]]


class StoreBusyError(RuntimeError):
    """Another process holds this task's store for writing."""


def _input_key(topic: str, partition: int) -> bytes:
    return b"%s%s/%d" % (_INPUT_PREFIX, topic.encode(), partition)


def _changelog_key(table: str) -> bytes:
    return _CHANGELOG_PREFIX + table.encode()


class TaskStore:
    """The LMDB environment of one task (see the module docstring for the layout).

    Open it in the process that uses it, after exec (LMDB handles do not survive a fork),
    and only once per process.  Not for concurrent use by several threads of one process
    while :meth:`commit` runs (the worker commits between batches).
    """

    def __init__(self, path: str, tables: Sequence[str], map_size: int = DEFAULT_MAP_SIZE,
                 *, readonly: bool = False, sync: bool = True, exclusive: bool = True) -> None:
        """Opens (creating if missing, unless ``readonly``) the environment at ``path``.

        ``tables``: the table databases to open (created when missing).  ``sync=False``
        trades durability of the last commits on a machine crash (not a process crash)
        for speed.  ``exclusive`` takes ``owner.lock`` so two writers can never share a
        task; readers (``readonly=True``) never take it.
        """
        for name in tables:
            _check_table_name(name)
        self.path = path
        self.readonly = readonly
        self.tables: List[str] = list(dict.fromkeys(tables))
        self._owner_fd: Optional[int] = None
        if not readonly:
            os.makedirs(path, exist_ok=True)
            if exclusive:
                self._owner_fd = _take_owner_lock(path)
        try:
            self.env = lmdb.open(
                path, map_size=map_size, subdir=True, max_dbs=len(self.tables) + 8,
                readonly=readonly, create=not readonly, lock=True, sync=sync,
                metasync=sync, readahead=False, meminit=False)
        except lmdb.Error:
            self._release_owner_lock()
            raise
        self._dbs: Dict[str, Any] = {}
        try:
            self._meta = self._open_db(META_DB)
            for name in self.tables:
                self._dbs[name] = self._open_db(name)
            if not readonly and self.get_meta(_FORMAT.decode()) is None:
                self.set_meta(_FORMAT.decode(), json.dumps(FORMAT_VERSION).encode())
        except BaseException:
            self.close()
            raise

    def _open_db(self, name: str) -> Any:
        if self.readonly:
            # a reader must not create; and opening a database uses a read transaction
            with self._read_txn() as txn:
                if txn.get(name.encode()) is None:
                    return None  # not written yet: reads as empty
            return self.env.open_db(name.encode(), create=False)
        return self.env.open_db(name.encode(), create=True)

    # -- life cycle -------------------------------------------------------------------
    def close(self) -> None:
        """Closes the environment (and lets another process take the task)."""
        env = getattr(self, "env", None)
        if env is not None:
            env.close()
            self.env = None  # type: ignore[assignment]
        self._release_owner_lock()

    def __enter__(self) -> "TaskStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _release_owner_lock(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)  # closing the descriptor releases the flock
            self._owner_fd = None

    @property
    def map_size(self) -> int:
        """The current size of the memory map (grows on demand)."""
        return int(self.env.info()["map_size"])

    # -- reads ------------------------------------------------------------------------
    def _read_txn(self) -> "lmdb.Transaction":
        """A read transaction; adopts a map that another process grew meanwhile."""
        try:
            return self.env.begin()
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)  # 0 = adopt the size the writer set
            return self.env.begin()

    def _db(self, table: str) -> Any:
        try:
            return self._dbs[table]
        except KeyError:
            raise KeyError(f"no table {table!r} in the store at {self.path} "
                           f"(tables: {', '.join(self.tables) or 'none'})") from None

    def get(self, table: str, key: bytes) -> Optional[bytes]:
        """The stored value of ``key`` in ``table``, or None."""
        db = self._db(table)
        if db is None:
            return None
        with self._read_txn() as txn:
            return txn.get(key, db=db)

    def items(self, table: str) -> Iterator[Tuple[bytes, bytes]]:
        """Every (key, value) of ``table`` in key order.  Reads in chunks of short read
        transactions: a long iteration never pins old pages or blocks a map resize; keys
        written meanwhile may or may not be seen (each chunk is a committed snapshot)."""
        db = self._db(table)
        if db is None:
            return
        last: Optional[bytes] = None
        while True:
            chunk: List[Tuple[bytes, bytes]] = []
            with self._read_txn() as txn:
                cursor = txn.cursor(db=db)
                if last is None:
                    more = cursor.first()
                else:
                    more = cursor.set_range(last)
                    if more and cursor.key() == last:
                        more = cursor.next()
                while more and len(chunk) < _ITEMS_CHUNK:
                    chunk.append((cursor.key(), cursor.value()))
                    more = cursor.next()
            yield from chunk
            if not more or not chunk:
                return
            last = chunk[-1][0]

    def first_items(self, table: str, upto: bytes) -> List[Tuple[bytes, bytes]]:
        """The (key, value) pairs of ``table`` whose key is ``< upto``, in key order (for
        range expiry of time-first window keys)."""
        db = self._db(table)
        out: List[Tuple[bytes, bytes]] = []
        if db is None:
            return out
        with self._read_txn() as txn:
            cursor = txn.cursor(db=db)
            more = cursor.first()
            while more:
                key = cursor.key()
                if key >= upto:
                    break
                out.append((key, cursor.value()))
                more = cursor.next()
        return out

    def range_items(self, table: str, lo: bytes, hi: bytes) -> List[Tuple[bytes, bytes]]:
        """The (key, value) pairs of ``table`` with ``lo <= key < hi``, in key order (the
        windows of a time-first key range: closing windows)."""
        db = self._db(table)
        out: List[Tuple[bytes, bytes]] = []
        if db is None:
            return out
        with self._read_txn() as txn:
            cursor = txn.cursor(db=db)
            more = cursor.set_range(lo)
            while more:
                key = cursor.key()
                if key >= hi:
                    break
                out.append((key, cursor.value()))
                more = cursor.next()
        return out

    def count(self, table: str) -> int:
        """Number of entries in ``table``."""
        db = self._db(table)
        if db is None:
            return 0
        with self._read_txn() as txn:
            return int(txn.stat(db)["entries"])

    # -- metadata -----------------------------------------------------------------------
    def get_meta(self, key: str) -> Optional[bytes]:
        """A raw metadata value (see the module docstring for the reserved keys)."""
        if self._meta is None:
            return None
        with self._read_txn() as txn:
            return txn.get(key.encode(), db=self._meta)

    def set_meta(self, key: str, value: Optional[bytes]) -> None:
        """Writes (None: deletes) one metadata value in a transaction of its own."""
        self._write(lambda txn: _put_or_delete(txn, key.encode(), value, self._meta))

    def stream_time(self) -> Optional[int]:
        """The stored stream time (:data:`META_LATEST_TIMESTAMP`), or None."""
        raw = self.get_meta(META_LATEST_TIMESTAMP)
        return None if raw is None else _OFFSET.unpack(raw)[0]

    def input_offset(self, topic: str, partition: int) -> Optional[int]:
        """The next offset of ``topic[partition]`` whose effects are NOT in the state
        (offset of the last applied record + 1), or None if none was ever applied."""
        raw = self.get_meta(_input_key(topic, partition).decode())
        return None if raw is None else _OFFSET.unpack(raw)[0]

    def input_offsets(self) -> Dict[Tuple[str, int], int]:
        """Every stored input offset: ``{(topic, partition): next offset}``."""
        out: Dict[Tuple[str, int], int] = {}
        for key, raw in self._meta_prefix(_INPUT_PREFIX):
            topic, _, part = key[len(_INPUT_PREFIX):].decode().rpartition("/")
            out[(topic, int(part))] = _OFFSET.unpack(raw)[0]
        return out

    def changelog_offset(self, table: str) -> Optional[int]:
        """The offset of the last changelog record of ``table`` in the state, or None."""
        raw = self.get_meta(_changelog_key(table).decode())
        return None if raw is None else _OFFSET.unpack(raw)[0]

    def changelog_offsets(self) -> Dict[str, int]:
        """Every stored changelog offset: ``{table: offset}``."""
        return {key[len(_CHANGELOG_PREFIX):].decode(): _OFFSET.unpack(raw)[0]
                for key, raw in self._meta_prefix(_CHANGELOG_PREFIX)}

    def origin_marks(self) -> Dict[str, Tuple[int, int]]:
        """The highest origin applied per upstream partition (:mod:`shardworker.origins`)."""
        prefix = META_ORIGIN_PREFIX.encode()
        out: Dict[str, Tuple[int, int]] = {}
        for key, raw in self._meta_prefix(prefix):
            offset, seq = raw.split()
            out[key[len(prefix):].decode()] = (int(offset), int(seq))
        return out

    def _meta_prefix(self, prefix: bytes) -> List[Tuple[bytes, bytes]]:
        if self._meta is None:
            return []
        out = []
        with self._read_txn() as txn:
            cursor = txn.cursor(db=self._meta)
            more = cursor.set_range(prefix)
            while more and cursor.key().startswith(prefix):
                out.append((cursor.key(), cursor.value()))
                more = cursor.next()
        return out

    def identity(self) -> Optional[Dict[str, str]]:
        """Where this state came from: ``{"cluster_id": ..., "source": ...}`` or None."""
        raw = self.get_meta(_IDENTITY.decode())
        return None if raw is None else json.loads(raw)

    def set_identity(self, cluster_id: str, source: str) -> None:
        """Records the Kafka cluster id and the source (topic) this state belongs to."""
        data = json.dumps({"cluster_id": cluster_id, "source": source}, sort_keys=True).encode()
        self.set_meta(_IDENTITY.decode(), data)

    def ensure_identity(self, cluster_id: str, source: str) -> bool:
        """Wipes the state if it came from another cluster or source, then records this
        identity.  Returns True when it wiped (the caller then restores from scratch)."""
        current = self.identity()
        wanted = {"cluster_id": cluster_id, "source": source}
        if current == wanted:
            return False
        wiped = current is not None
        if wiped:
            self.wipe()
        self.set_identity(cluster_id, source)
        return wiped

    def wipe(self) -> None:
        """Empties every table and the metadata (offsets, identity) in one transaction."""

        def drop(txn: "lmdb.Transaction") -> None:
            for db in list(self._dbs.values()) + [self._meta]:
                txn.drop(db, delete=False)
            txn.put(_FORMAT, json.dumps(FORMAT_VERSION).encode(), db=self._meta)

        self._write(drop)

    # -- writes -------------------------------------------------------------------------
    def commit(self, writes: WriteSet, input_offsets: Mapping[Tuple[str, int], int],
               changelog_offsets: Mapping[str, int],
               meta: Optional[Mapping[str, Optional[bytes]]] = None) -> None:
        """Applies a batch atomically: ``writes`` (``{table: {key: value or None}}``, None
        deletes) AND, in the same write transaction, the input offsets (``{(topic,
        partition): next offset to read}``) and changelog offsets (``{table: offset of the
        last changelog record written}``) they reflect, plus optional raw ``meta`` values.
        Grows the map and retries on ``MapFullError``."""
        dbs = [(self._db(table), kv) for table, kv in writes.items() if kv]
        meta_db = self._meta
        pack = _OFFSET.pack

        def apply(txn: "lmdb.Transaction") -> None:
            put = txn.put
            delete = txn.delete
            for db, kv in dbs:
                # one operation per key, so order does not matter: puts go in key order
                # through putmulti (fewer page splits, no Python call per key)
                puts = sorted([(k, v) for k, v in kv.items() if v is not None])
                if puts:
                    txn.cursor(db=db).putmulti(puts)
                if len(puts) < len(kv):
                    for key, value in kv.items():
                        if value is None:
                            delete(key, db=db)
            for (topic, partition), offset in input_offsets.items():
                put(_input_key(topic, partition), pack(offset), db=meta_db)
            for table, offset in changelog_offsets.items():
                put(_changelog_key(table), pack(offset), db=meta_db)
            if meta:
                for key, value in meta.items():
                    _put_or_delete(txn, key.encode(), value, meta_db)

        self._write(apply)

    def _write(self, apply: Any) -> None:
        """Runs ``apply(txn)`` in one write transaction; on a full map, aborts, doubles the
        map and runs it again (as often as needed)."""
        if self.readonly:
            raise PermissionError(f"the store at {self.path} is open read-only")
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    apply(txn)
                return
            except lmdb.MapFullError:
                # the with-block aborted the transaction; no transaction is open now
                self.env.set_mapsize(self.map_size * 2)


def stream_time_meta(stream_time_ms: int) -> Dict[str, bytes]:
    """The ``meta`` argument of :meth:`TaskStore.commit` that stores a stream time."""
    return {META_LATEST_TIMESTAMP: _OFFSET.pack(stream_time_ms)}


def _put_or_delete(txn: "lmdb.Transaction", key: bytes, value: Optional[bytes], db: Any) -> None:
    if value is None:
        txn.delete(key, db=db)
    else:
        txn.put(key, value, db=db)


def _check_table_name(name: str) -> None:
    if not name or name.startswith("__") or "/" in name:
        raise ValueError(f"bad table name {name!r}: it must be non-empty, contain no '/' "
                         "and not start with '__' (reserved)")


def _take_owner_lock(path: str) -> int:
    lock_path = os.path.join(path, "owner.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise StoreBusyError(f"task store {path} is in use by another process "
                                 f"(pid {holder})") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def list_tables(path: str) -> List[str]:
    """The table databases present in the environment at ``path`` (read-only look)."""
    env = lmdb.open(path, readonly=True, lock=True, subdir=True, max_dbs=0, create=False)
    try:
        with env.begin() as txn:
            names = [key.decode() for key, _ in txn.cursor()]
    finally:
        env.close()
    return [name for name in names if name != META_DB]


def open_readonly(path: str, tables: Optional[Sequence[str]] = None) -> TaskStore:
    """Opens a task's store for reading from ANOTHER process while its worker writes
    (the ``shardsup table`` CLI).  ``tables`` defaults to every table found.

    It uses LMDB's lock file (``readonly=True, lock=True``): the reader registers in the
    reader table so the writer never reuses pages it still reads.  That needs write
    permission on ``lock.mdb`` (run it as the worker's user).  A reader without the lock
    (``lock=False``) could see pages the writer is recycling, so it is not offered.
    Never open it in the worker process that has the same environment open.
    """
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise FileNotFoundError(f"no task store at {path}")
    if tables is None:
        tables = list_tables(path)
    return TaskStore(path, tables, map_size=0, readonly=True, exclusive=False)
