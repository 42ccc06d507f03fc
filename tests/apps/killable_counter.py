"""Test app: :mod:`tests.apps.counter` whose child kills itself with SIGKILL right after
an LMDB commit that moved a task's input offset, once the file named by
``SHARDSUP_TEST_KILL_MARKER`` exists (the test creates it: an event, not a count).  The
state is then ahead of what the supervisor heard, as after a kill -9 of a busy child.
"""
import os
import signal

from shardworker import tasktables
from tests.apps.counter import app  # noqa: F401 - the app the loader looks for

MARKER = os.environ.get("SHARDSUP_TEST_KILL_MARKER", "")
_commit = tasktables.TaskTables._commit


def _commit_then_die(self, batch, changelog_offsets):
    moved = any(nxt > self.stored.get(tp, -1) for tp, nxt in batch.input_offsets.items())
    _commit(self, batch, changelog_offsets)
    if moved and MARKER and os.path.exists(MARKER):
        os.unlink(MARKER)
        os.kill(os.getpid(), signal.SIGKILL)


tasktables.TaskTables._commit = _commit_then_die
