"""Framed messages between the supervisor and a child over one socketpair.

A frame is a 4-byte big-endian length followed by a UTF-8 JSON object with an ``op`` key.
Supervisor → child: ``assign``, ``revoke``, ``stop``, ``group``, ``timers`` (``run``: this
child runs the app's timers, or stops running them).  Child → supervisor: ``ready``,
``offsets`` (processed-up-to, i.e. the next offset to read), ``revoked``, ``stats``,
``failed`` (``error``; ``broker_unavailable`` when the broker, not the agent, stopped
it).  Messages are small and rare (a few per second), so JSON is plenty.
"""
from __future__ import annotations

import json
import socket
import struct
from typing import Any, Dict, List

_HEADER = struct.Struct(">I")

#: A child's exit code when it stopped because the broker could not be reached: the
#: supervisor restarts it (with a backoff) without counting a crash toward FAILED, since
#: crash backoff is for the agent's own code (DESIGN.md, "Processes").  75 is EX_TEMPFAIL.
EXIT_BROKER_UNAVAILABLE = 75


class ChannelClosed(EOFError):
    """The other end of the channel has gone (process exited or was killed)."""


class Channel:
    """One end of a supervisor↔child socketpair; reads never block."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self._inbox = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: str, **fields: Any) -> None:
        """Writes one message; blocks only while the peer's socket buffer is full."""
        body = json.dumps({"op": op, **fields}, separators=(",", ":")).encode()
        data = _HEADER.pack(len(body)) + body
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        finally:
            self.sock.setblocking(False)

    def receive(self) -> List[Dict[str, Any]]:
        """Every complete message that has arrived so far (possibly none)."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            if not chunk:
                if self._inbox:
                    break  # hand out what is complete; EOF is reported on the next call
                raise ChannelClosed("peer closed the channel")
            self._inbox += chunk
        messages = []
        while len(self._inbox) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._inbox)
            if len(self._inbox) < _HEADER.size + size:
                break
            body = bytes(self._inbox[_HEADER.size:_HEADER.size + size])
            del self._inbox[:_HEADER.size + size]
            messages.append(json.loads(body))
        return messages

    def close(self) -> None:
        self.sock.close()
