"""Finds the user's App from ``-A module`` or ``-A module:attr``."""
from __future__ import annotations

import importlib
import os
import sys

from .app import App


class AppNotFound(Exception):
    """The ``-A`` argument does not lead to an App; the message is one line for the user."""


def load_app(spec: str) -> App:
    """Imports the module (the current directory is on the path, as with ``python -m``) and
    returns the App named by ``:attr``, or the single App the module defines."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise AppNotFound(f"-A {spec!r}: give a module, e.g. -A proj or -A proj:app")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AppNotFound(f"cannot import app module {module_name!r}: no such module "
                              f"(searched the current directory and sys.path)") from None
        raise
    if attr:
        app = getattr(module, attr, None)
        if not isinstance(app, App):
            raise AppNotFound(f"{module_name}:{attr} is not a shardworker.App")
        return app
    apps = [value for value in vars(module).values() if isinstance(value, App)]
    if not apps:
        raise AppNotFound(f"module {module_name!r} defines no shardworker.App")
    if len({id(a) for a in apps}) > 1:
        names = ", ".join(sorted(k for k, v in vars(module).items() if isinstance(v, App)))
        raise AppNotFound(f"module {module_name!r} defines several Apps ({names}); "
                          f"pick one with -A {module_name}:NAME")
    return apps[0]
