"""Test app: :mod:`tests.apps.counter` whose restores are slow and store their progress
every 500 changelog records; once a table's restore is past 1,000 records it creates the
file named by ``SHARDSUP_TEST_RESTORE_MARKER`` (the event the test waits for) and goes on
at 2 ms per record, so the test can stop the child in the middle of a restore."""
import os
import time

from shardworker import restore
from tests.apps.counter import app  # noqa: F401 - the app the loader looks for

MARKER = os.environ["SHARDSUP_TEST_RESTORE_MARKER"]
restore.RESTORE_BATCH = 100         # asks should_stop() every 100 records
restore.RESTORE_COMMIT_EVERY = 500
_apply = restore.apply_changelog


def _slow_apply(store, table, records, *args, **kwargs):
    def slowly():
        for n, record in enumerate(records, 1):
            if n > 1_000:
                if not os.path.exists(MARKER):
                    open(MARKER, "w").close()
                time.sleep(0.002)
            yield record

    return _apply(store, table, slowly(), *args, **kwargs)


restore.apply_changelog = _slow_apply
