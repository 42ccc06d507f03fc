"""systemd's ``sd_notify`` protocol, without libsystemd or any other dependency.

Under a ``Type=notify`` unit systemd passes ``$NOTIFY_SOCKET``: the path of an AF_UNIX
datagram socket (or, with a leading ``@``, a name in the abstract namespace).  A service
reports its state by sending newline-separated ``KEY=VALUE`` assignments to it:
``READY=1`` when it serves (systemd waits for it before ``systemctl start`` returns),
``STATUS=...`` shown by ``systemctl status``, ``WATCHDOG=1`` as a keep-alive when
``WatchdogSec=`` is set, ``STOPPING=1`` and ``RELOADING=1``.  See sd_notify(3).

Everything here is best effort: outside systemd (no ``$NOTIFY_SOCKET``) the calls do
nothing and return False, and a failure to send is logged at debug level, never raised,
because reporting to the service manager must never take the supervisor down.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Optional

log = logging.getLogger("supervisor.sdnotify")


def _address(raw: str) -> Optional[str]:
    """The ``connect()`` address for ``$NOTIFY_SOCKET``: a filesystem path, or ``@name``
    mapped to the abstract namespace (a leading NUL).  Other schemes (``vsock:``) are not
    supported: None."""
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


def notify(message: str) -> bool:
    """Sends ``message`` to ``$NOTIFY_SOCKET`` as one datagram; True if it was sent."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.debug("sd_notify: unsupported NOTIFY_SOCKET %r", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", raw, exc)
        return False


def _clean(text: str) -> str:
    """One line: a newline in a STATUS text would start a new assignment."""
    return " ".join(text.splitlines())


def ready(status: Optional[str] = None) -> bool:
    """``READY=1`` (and ``STATUS=``): start-up finished, or a reload finished."""
    return notify("READY=1" + (f"\nSTATUS={_clean(status)}" if status else ""))


def status(text: str) -> bool:
    """``STATUS=...``: one line that ``systemctl status`` shows."""
    return notify(f"STATUS={_clean(text)}")


def watchdog() -> bool:
    """``WATCHDOG=1``: the keep-alive; send it every :func:`watchdog_interval` seconds."""
    return notify("WATCHDOG=1")


def stopping(status_text: Optional[str] = None) -> bool:
    """``STOPPING=1``: shutdown began (systemd then stops expecting watchdog pings)."""
    return notify("STOPPING=1" + (f"\nSTATUS={_clean(status_text)}" if status_text else ""))


def reloading(status_text: Optional[str] = None) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, as systemd >= 253 wants).

    systemd then shows the unit as "reloading" until the service sends ``READY=1``
    again: call :func:`ready` once the reload (restarting the children) is done.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = f"RELOADING=1\nMONOTONIC_USEC={usec}"
    if status_text:
        message += f"\nSTATUS={_clean(status_text)}"
    return notify(message)


def watchdog_interval() -> Optional[float]:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``, or None when systemd
    expects none (unset, invalid, or ``$WATCHDOG_PID`` names another process)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2


__all__ = ["notify", "ready", "status", "watchdog", "stopping", "reloading", "watchdog_interval"]
