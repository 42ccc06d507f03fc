"""The supervisor's control socket: ``shardsup status`` asks a running supervisor how it is.

The supervisor owns a Unix stream socket (by convention in its datadir).  A client
connects, writes one request line (a command word such as ``status`` or ``dump``), and
reads one JSON document back; then the connection is closed.  The protocol is line based
and tiny on purpose, so that ``socat - UNIX-CONNECT:<datadir>/supervisor.sock`` works too.

Serving happens *in the supervisor's main loop*, not in a thread: :meth:`StatusServer.fileno`
goes into the loop's ``select()`` and :meth:`StatusServer.serve_ready` answers whatever is
pending.  Every client is bounded in time (``CLIENT_TIMEOUT``) and size (``MAX_REQUEST``)
and every error it can provoke is logged and swallowed, so a stuck or hostile client can
delay the loop by at most about a second and can never crash it.

Access control is two layers: the socket file is mode 0600 (only the owner can
``connect()``), and each peer's uid is checked with ``SO_PEERCRED`` (only the
supervisor's own uid or root are answered), which also holds when the file mode was
loosened by someone or the fd was passed around.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import stat
import struct
import time
from typing import Any, Callable, Dict, List, Optional

from .errors import UsageError
from .subtopologies import format_groups

log = logging.getLogger("supervisor.status")

#: Longest request line we read; anything longer is refused (the commands are words).
MAX_REQUEST = 1024
#: Seconds one client may take to send its request line and take its reply, in total.
CLIENT_TIMEOUT = 1.0
#: ``struct ucred`` as returned by ``getsockopt(SO_PEERCRED)``: pid, uid, gid.
UCRED = struct.Struct("3i")
#: Longest path ``sockaddr_un`` takes on Linux (108 bytes including the terminating NUL).
MAX_SOCKET_PATH = 107

Handler = Callable[[str], Dict[str, Any]]


def status_socket_path(datadir: str) -> str:
    """Where the supervisor of ``datadir`` answers ``shardsup status``."""
    return os.path.join(datadir, "supervisor.sock")


class _ClientGone(Exception):
    """The client closed before sending anything: nothing to answer."""


def _check_path_length(path: str) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(f"socket path {path} is too long for a Unix socket "
                         f"(at most {MAX_SOCKET_PATH} bytes); use a shorter --datadir")


class StatusServer:
    """Answers control requests on a Unix socket, one short connection at a time.

    ``handler(command)`` is called in the caller's thread (the supervisor's main loop)
    with the request line, stripped (``"status"`` when the client sent an empty line),
    and must return a JSON-serialisable dict.  If it raises, the client gets
    ``{"error": "internal error: ..."}`` and the exception is logged.
    """

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.sock: Optional[socket.socket] = None
        _check_path_length(path)
        self._unlink_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # bind() creates the file with the umask applied; tighten it at once.  The
            # SO_PEERCRED check below is what really guards the socket, so the instant
            # between bind and chmod (before listen: nobody can connect yet) is harmless.
            os.chmod(path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot create the control socket {path}: {exc.strerror or exc}") from None
        self.sock = sock  # Python sockets are non-inheritable: children never get it

    def _unlink_stale(self) -> None:
        """Removes a socket left by a supervisor that died (the datadir lock makes sure it
        is not a live one); refuses to remove anything that is not a socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(f"{self.path} exists and is not a socket; remove it or choose another datadir")
        os.unlink(self.path)

    def fileno(self) -> int:
        """The listening socket's fd, readable when a client is waiting (for ``select``)."""
        if self.sock is None:
            raise ValueError("status server is closed")
        return self.sock.fileno()

    def serve_ready(self) -> int:
        """Accepts and answers every pending client; returns how many were served.

        Never raises: a client that misbehaves (too slow, too long, gone) is logged at
        debug or warning level and dropped.
        """
        served = 0
        if self.sock is None:
            return served
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return served
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS... : try again on the next loop iteration
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    log.warning("control socket accept failed: %s", exc)
                    return served
                continue
            try:
                self._serve(conn)
                served += 1
            except (TimeoutError, socket.timeout):
                log.warning("control socket: dropped a client that took over %.1fs", CLIENT_TIMEOUT)
            except (ConnectionError, _ClientGone) as exc:
                log.debug("control socket: client went away: %s", exc)
            except Exception as exc:  # noqa: BLE001 - a client must never break the loop
                log.warning("control socket: client dropped: %s: %s", type(exc).__name__, exc)
            finally:
                _drain_and_close(conn)

    def _serve(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + CLIENT_TIMEOUT
        conn.setblocking(True)
        pid, uid, _gid = peer_credentials(conn)
        # The request is read even from a client about to be refused: answering before it
        # wrote would make its write fail (EPIPE) and hide the answer from it.
        line = self._read_line(conn, deadline)
        if uid not in (os.getuid(), 0):
            log.warning("control socket: refused pid %d (uid %d)", pid, uid)
            self._reply(conn, {"error": "permission denied"}, deadline)
            return
        if line is None:
            self._reply(conn, {"error": f"bad request: one line of at most {MAX_REQUEST} bytes, "
                                        "UTF-8, ending with a newline"}, deadline)
            return
        command = line.strip() or "status"
        try:
            response = self.handler(command)
        except Exception as exc:  # noqa: BLE001 - the client gets one line, the log the rest
            log.exception("control socket: handler failed on %r", command)
            response = {"error": f"internal error: {type(exc).__name__}: {exc}"}
        self._reply(conn, response, deadline)

    @staticmethod
    def _read_line(conn: socket.socket, deadline: float) -> Optional[str]:
        """The request line, or None when it is too long or not UTF-8.  A client that
        closes without a newline has sent its whole request (``echo -n status`` works)."""
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no request line within %.1fs" % CLIENT_TIMEOUT)
            conn.settimeout(remaining)
            chunk = conn.recv(MAX_REQUEST + 1 - len(data))
            if not chunk:
                if not data:
                    raise _ClientGone("closed without a request")
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                return None
        try:
            return data.split(b"\n", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            return None

    @staticmethod
    def _reply(conn: socket.socket, response: Dict[str, Any], deadline: float) -> None:
        payload = (json.dumps(response, default=str) + "\n").encode("utf-8")
        conn.settimeout(max(0.05, deadline - time.monotonic()))
        conn.sendall(payload)
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Stops listening and removes the socket file (idempotent)."""
        if self.sock is None:
            return
        try:
            self.sock.close()
        finally:
            self.sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.debug("could not remove %s: %s", self.path, exc)

    def __enter__(self) -> "StatusServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain_and_close(conn: socket.socket) -> None:
    """Closes a client connection after reading what it sent and we did not need: Linux
    resets the peer (ECONNRESET) when a Unix socket is closed with unread data, which
    could make the client miss the reply we just sent."""
    try:
        conn.setblocking(False)
        for _ in range(4):
            if not conn.recv(MAX_REQUEST):
                break
    except OSError:
        pass
    try:
        conn.close()
    except OSError:
        pass


def peer_credentials(conn: socket.socket) -> "tuple[int, int, int]":
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    pid, uid, gid = UCRED.unpack(raw)
    return pid, uid, gid


def query(path: str, command: str = "status", timeout: float = 5.0) -> Dict[str, Any]:
    """Sends ``command`` to the supervisor listening on ``path``; returns its JSON reply.

    Every failure is a :class:`UsageError` with one line for the user: no socket (no
    supervisor running), permission denied, no answer in time, a garbled answer, or an
    answer that is only ``{"error": "..."}`` (the supervisor refused the request).
    """
    datadir = os.path.dirname(os.path.abspath(path))
    if "\n" in command or len(command.encode("utf-8")) >= MAX_REQUEST:
        raise UsageError(f"bad control command {command[:40]!r}")
    _check_path_length(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise UsageError(f"no supervisor is running for datadir {datadir} "
                             f"(no socket at {path})") from None
        except PermissionError:
            raise UsageError(f"permission denied on {path}: run this as the user of the "
                             "supervisor (or root)") from None
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.ENOTDIR):
                raise UsageError(f"no supervisor is running for datadir {datadir} "
                                 f"(no socket at {path})") from None
            raise UsageError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        chunks: List[bytes] = []
        try:
            try:
                sock.sendall(command.encode("utf-8") + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered (a refusal) before reading: the answer is still there
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            raise UsageError(f"the supervisor at {path} did not answer within {timeout:g}s") from None
        except OSError as exc:
            if not chunks:  # a refusal may reset the connection after the reply was sent
                raise UsageError(f"the supervisor at {path} closed the connection: "
                                 f"{exc.strerror or exc}") from None
    finally:
        sock.close()
    data = b"".join(chunks)
    try:
        reply = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UsageError(f"the supervisor at {path} sent an answer that is not JSON "
                         f"({len(data)} bytes)") from None
    if not isinstance(reply, dict):
        raise UsageError(f"the supervisor at {path} sent an answer that is not a JSON object")
    if set(reply) == {"error"}:
        raise UsageError(f"the supervisor at {path} refused {command!r}: {reply['error']}")
    return reply


# -- formatting --------------------------------------------------------------------------

def format_duration(seconds: Optional[float]) -> str:
    """``45s``, ``12m03s``, ``3h04m``, ``2d03h``: short and sortable by eye."""
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds < 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _num(value: Any, fmt: str = "{:d}") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def _lag_sum(lag: Any) -> str:
    """Sum of the known lags; ``-`` when none is known, ``+?`` when some are unknown."""
    if not isinstance(lag, dict) or not lag:
        return "-"
    known = [v for v in lag.values() if isinstance(v, int)]
    if not known:
        return "-"
    return f"{sum(known)}{'+?' if len(known) < len(lag) else ''}"


def _one_line(text: Any, width: int) -> str:
    if not text:
        return "-"
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


ERROR_WIDTH = 60


def format_status(snapshot: Dict[str, Any]) -> str:
    """The snapshot as a human-readable block: the supervisor, one row per child, the
    tasks' states, then the tasks grouped by sub-topology with their lag and the lag of
    each repartition topic (:func:`supervisor.subtopologies.format_groups`).

    Tolerates missing keys (a client may talk to a supervisor of another version): what
    is absent shows as ``-``.
    """
    sup = snapshot.get("supervisor") or {}
    group = sup.get("group") or {}
    lines = [
        f"supervisor  pid {sup.get('pid', '-')}  app {sup.get('app', '-')}  "
        f"state {sup.get('state', '-')}  uptime {format_duration(sup.get('uptime_s'))}",
        f"group       {group.get('state', '-')}  generation {_num(group.get('generation'))}  "
        f"rebalances {_num(group.get('rebalances'))}  member {group.get('member_id') or '-'}",
        f"broker      {sup.get('broker', '-')}",
        f"datadir     {sup.get('datadir', '-')}",
        "",
    ]
    children = sorted(snapshot.get("children") or [], key=lambda c: c.get("index", 0))
    header = ["CHILD", "PID", "STATE", "UPTIME", "RESTARTS", "REC/S", "TOTAL", "ERRORS",
              "LAG", "RSS MiB", "CPU%", "TASKS", "LAST ERROR"]
    rows = []
    for child in children:
        rss = child.get("rss_bytes")
        rows.append([
            _num(child.get("index")),
            _num(child.get("pid")),
            str(child.get("state", "-")),
            format_duration(child.get("uptime_s")),
            _num(child.get("restarts")),
            _num(child.get("records_per_s"), "{:.1f}"),
            _num(child.get("records_total")),
            _num(child.get("errors_total")),
            _lag_sum(child.get("lag")),
            _num(rss / 1048576 if isinstance(rss, (int, float)) else None, "{:.1f}"),
            _num(child.get("cpu_percent"), "{:.1f}"),
            ",".join(child.get("tasks") or []) or "-",
            _one_line(child.get("last_error"), ERROR_WIDTH),
        ])
    if not rows:
        lines.append("no children")
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        right = {1, 3, 4, 5, 6, 7, 8, 9, 10}  # numbers align right
        for row in [header] + rows:
            cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                     for i, cell in enumerate(row)]
            lines.append("  ".join(cells).rstrip())
    tasks = snapshot.get("tasks") or {}
    if tasks:
        states: Dict[str, int] = {}
        for info in tasks.values():
            state = str((info or {}).get("state", "?"))
            states[state] = states.get(state, 0) + 1
        lines.append("")
        lines.append(f"tasks       {len(tasks)}: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
        for task_id, info in sorted(tasks.items()):
            if (info or {}).get("state") == "failed":
                lines.append(f"FAILED      {task_id}: {_one_line(info.get('last_error'), 200)} "
                             f"(tried again in {format_duration(info.get('retry_in_s'))})")
    groups = format_groups(snapshot)
    if groups:
        lines += [""] + groups
    return "\n".join(lines)


__all__ = ["StatusServer", "query", "format_status", "format_duration", "peer_credentials",
           "MAX_REQUEST", "CLIENT_TIMEOUT"]
