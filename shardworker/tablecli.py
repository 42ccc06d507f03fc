"""``shardsup table``: a table's contents read straight from the tasks' LMDB files (a
global table's from the supervisor's one copy: :func:`read_global_table`).

Only the tasks this datadir owns are shown: a task revoked from it (moved to another
machine, or to another supervisor on this one) keeps its files here, marked released,
and its copy goes stale as the new owner processes on; it is skipped (DESIGN.md,
"State (LMDB)").  A task taken back clears the mark when it opens its store again."""
from __future__ import annotations

import os
from typing import Any, Dict, List

from .app import App
from .globaltables import global_dir, open_copy
from .state import META_RELEASED, task_dir
from .store import open_readonly
from .windows import split_window_key


class TableReadError(LookupError):
    """The table, its state or the key is not there; the message is one line."""


def read_table(app: App, datadir: str, name: str, key: Any = None) -> Any:
    """Every task's part of table ``name`` merged: ``{key: value}`` as JSON-ready data
    (keys rendered as JSON text when they are not strings); windowed tables give
    ``{key: {"<start>-<end>": value}}`` with window bounds in seconds (session windows:
    each session, end included; sliding windows: each bucket, ``"<t>-<t>"``).  With ``key``: that
    key's value (an error when absent).  Stores of tasks released by this datadir (see
    the module docstring) are left out."""
    if any(t.name == name for t in app.global_tables):
        return read_global_table(app, datadir, name, key)
    table = next((t for t in app.tables if t.name == name), None)
    if table is None:
        known = ", ".join(t.name for t in app.tables + app.global_tables) or "none"
        raise TableReadError(f"app {app.id!r} has no table {name!r} (tables: {known})")
    tasks_root = os.path.dirname(task_dir(datadir, app.id, "x"))
    if not os.path.isdir(tasks_root):
        raise TableReadError(f"no task state under {tasks_root}")
    merged: Dict[Any, Any] = {}
    for task in sorted(os.listdir(tasks_root)):
        path = os.path.join(tasks_root, task)
        try:
            store = open_readonly(path)
        except FileNotFoundError:
            continue
        try:
            if name not in store.tables or store.get_meta(META_RELEASED) is not None:
                continue
            layout = getattr(table.window, "layout", None)  # sessions, sliding windows
            if layout is not None:
                for key_bytes, start_ms, end_ms, raw in layout.stored(store.items(name)):
                    merged.setdefault(_render(table._decode_key(key_bytes)), {})[
                        window_label(start_ms, end_ms)] = table._decode_value(raw)
                continue
            for kb, raw in store.items(name):
                value = table._decode_value(raw)
                if table.window is not None:
                    start_ms, key_bytes = split_window_key(kb)
                    bounds = window_label(start_ms, start_ms + table.window.size_ms)
                    merged.setdefault(_render(table._decode_key(key_bytes)), {})[bounds] = value
                else:
                    merged[_render(table._decode_key(kb))] = value
        finally:
            store.close()
    if key is None:
        return merged
    rendered = _render(key)
    if rendered not in merged:
        raise TableReadError(f"table {name!r} has no key {key!r}")
    return merged[rendered]


def read_global_table(app: App, datadir: str, name: str, key: Any = None) -> Any:
    """Global table ``name`` as this datadir's copy holds it: ``{key: value}`` decoded with
    its topic's serializers (keys rendered as for :func:`read_table`), or one key's
    value.  The copy may still be catching up (DESIGN.md, "Global tables")."""
    table = next(t for t in app.global_tables if t.name == name)
    path = global_dir(datadir, app.id, name)
    try:
        store = open_copy(path, name)
    except FileNotFoundError:
        raise TableReadError(f"no copy of global table {name!r} at {path}") from None
    try:
        if key is not None:
            raw = store.get(name, table.topic.encode_key(key))
            if raw is None:
                raise TableReadError(f"global table {name!r} has no key {key!r}")
            return _text(table.topic.decode_value(raw))
        return {_render(_text(table.topic.decode_key(kb))): _text(table.topic.decode_value(raw))
                for kb, raw in store.items(name)}
    finally:
        store.close()


def key_serializer(app: App, name: str) -> str:
    """How ``shardsup table NAME KEY`` reads KEY: JSON text for a task table, and for a
    global table as its topic's key serializer says (``str``/``raw``: the text itself)."""
    table = next((t for t in app.global_tables if t.name == name), None)
    return "json" if table is None else table.topic.key_serializer


def window_label(start_ms: int, end_ms: int) -> str:
    """``"<start>-<end>"`` in epoch seconds, as ``shardsup table`` shows a window."""
    def seconds(ms: int) -> str:
        return f"{ms / 1000:.3f}".rstrip("0").rstrip(".")

    return f"{seconds(start_ms)}-{seconds(end_ms)}"


def _text(data: Any) -> Any:
    """A ``raw`` serializer's bytes as JSON can show them (UTF-8, undecodable bytes
    replaced); anything else as it is."""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _render(key: Any) -> Any:
    import json

    return key if isinstance(key, str) else json.dumps(key)


__all__: List[str] = ["read_table", "read_global_table", "key_serializer"]
