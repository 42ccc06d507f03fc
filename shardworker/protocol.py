"""Typed messages between the supervisor and a child over one socketpair.

Supervisor → child: :class:`Assign`, :class:`Revoke`, :class:`Stop`, :class:`Group`,
:class:`Timers`.  Child → supervisor: :class:`Ready`, :class:`Offsets`,
:class:`Revoked`, :class:`Bye` (each with processed-up-to offsets, i.e. the next offset
to read), :class:`Stats` (the heartbeat), :class:`Failed`.  On the wire a frame is a
4-byte big-endian length and a UTF-8 JSON object: the message's fields and its ``op``.
Messages are small and rare (a few per second), so JSON is plenty.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Type

_HEADER = struct.Struct(">I")

#: A child's exit code when it stopped because the broker could not be reached: the
#: supervisor restarts it (with a backoff) without counting a crash toward FAILED, since
#: crash backoff is for the agent's own code (DESIGN.md, "Processes").  75 is EX_TEMPFAIL.
EXIT_BROKER_UNAVAILABLE = 75


#: ``[topic, partition, offset]``; offsets are the next offset to read
Offset = List[Any]


class Message:
    """A message on the channel; ``op`` names its kind on the wire."""

    op: ClassVar[str] = ""

    def fields(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


# -- supervisor → child --------------------------------------------------------------------
@dataclass(frozen=True)
class Assign(Message):
    """Take these partitions, reading each from its offset (or where the task says)."""
    op: ClassVar[str] = "assign"
    partitions: List[Offset]


@dataclass(frozen=True)
class Revoke(Message):
    """Give back ``[topic, partition]`` after settling them; answered with :class:`Revoked`."""
    op: ClassVar[str] = "revoke"
    partitions: List[List[Any]]


@dataclass(frozen=True)
class Stop(Message):
    """Finish the batch, settle everything and exit (as SIGTERM does)."""
    op: ClassVar[str] = "stop"


@dataclass(frozen=True)
class Group(Message):
    """The group member's ``consumer_group_metadata()`` (base64), for transactions."""
    op: ClassVar[str] = "group"
    metadata: str


@dataclass(frozen=True)
class Timers(Message):
    """Run the app's timers (or stop running them): one child of the group does."""
    op: ClassVar[str] = "timers"
    run: bool


# -- child → supervisor --------------------------------------------------------------------
@dataclass(frozen=True)
class Ready(Message):
    """The child is set up and takes assignments."""
    op: ClassVar[str] = "ready"
    pid: int = 0


@dataclass(frozen=True)
class Offsets(Message):
    """Processed up to these offsets (their effects are durable)."""
    op: ClassVar[str] = "offsets"
    offsets: List[Offset]


@dataclass(frozen=True)
class Revoked(Message):
    """The answer to :class:`Revoke`: the final offsets of what was given back."""
    op: ClassVar[str] = "revoked"
    offsets: List[Offset]


@dataclass(frozen=True)
class Bye(Message):
    """The last offsets of a child that stops."""
    op: ClassVar[str] = "bye"
    offsets: List[Offset]


@dataclass(frozen=True)
class Stats(Message):
    """The heartbeat: counters of this process, the tasks it runs and their lag."""
    op: ClassVar[str] = "stats"
    processed: int = 0
    errors: int = 0
    tasks: List[str] = field(default_factory=list)
    #: task → records behind the end of its partitions (None: not known yet)
    lag: Dict[str, Optional[int]] = field(default_factory=dict)
    restoring: bool = False
    #: task → source topic → records behind the end of the task's partition of it, so
    #: status can show a repartition topic's lag (``lag`` is the sum per task)
    topic_lag: Dict[str, Dict[str, Optional[int]]] = field(default_factory=dict)
    #: metric name → family with the series changed since the last heartbeat, cumulative
    #: over this process (user metrics and shardsup's own: :mod:`shardworker.metrics`)
    metrics: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def lag_total(per_topic: Dict[str, Optional[int]]) -> Optional[int]:
    """A task's lag over all its topics (:attr:`Stats.lag` from :attr:`Stats.topic_lag`):
    None when one of them is not known yet."""
    total = 0
    for lag in per_topic.values():
        if lag is None:
            return None
        total += lag
    return total


@dataclass(frozen=True)
class Failed(Message):
    """Why the child stops; ``broker_unavailable``: the broker, not the agent's code."""
    op: ClassVar[str] = "failed"
    error: str
    broker_unavailable: bool = False


MESSAGES: Dict[str, Type[Message]] = {cls.op: cls for cls in (
    Assign, Revoke, Stop, Group, Timers, Ready, Offsets, Revoked, Bye, Stats, Failed)}


def decode(obj: Dict[str, Any]) -> Message:
    """The message a received JSON object holds (ValueError for an unknown ``op``).
    Fields this version does not know are ignored, so a child started from newer code
    (a HUP after an upgrade) can still talk to this supervisor."""
    fields = dict(obj)
    kind = MESSAGES.get(fields.pop("op", None))  # type: ignore[arg-type]
    if kind is None:
        raise ValueError(f"unknown message {obj.get('op')!r}")
    known = {f.name for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    return kind(**{k: v for k, v in fields.items() if k in known})


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

    def send(self, message: Message) -> None:
        """Writes one message; blocks only while the peer's socket buffer is full."""
        body = json.dumps({"op": message.op, **message.fields()}, separators=(",", ":")).encode()
        data = _HEADER.pack(len(body)) + body
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        finally:
            self.sock.setblocking(False)

    def receive(self) -> List[Message]:
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
            messages.append(decode(json.loads(body)))
        return messages

    def close(self) -> None:
        self.sock.close()
