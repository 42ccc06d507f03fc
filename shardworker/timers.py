"""The app's timers, crontab jobs and startup tasks, run in the one child the supervisor
chose (DESIGN.md, "Timers, crontab and tasks").

:class:`TimerRunner` is a part of :class:`~shardworker.worker.Worker` (which inherits it),
kept apart so that ``worker.py`` holds the record path and little else; the worker calls
:meth:`TimerRunner.run_timers` between batches.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Dict

# the lines keep the logger name they were always logged under
log = logging.getLogger("shardworker.worker")


class TimerRunner:
    """Runs due timers and jobs (see the module docstring).  Attributes are the
    :class:`~shardworker.worker.Worker`'s."""

    # set by the worker
    app: Any
    tasks: Any
    jobs: Any
    committer: Any
    loop: Any
    stopping: bool
    _timer_due: Dict[str, float]
    handle_control: Any  # SupervisorLink's

    #: set by the supervisor's ``timers`` message: exactly one child (the one with the
    #: lowest running task) runs the app's timers, and it moves when that child fails
    runs_timers = False

    def run_timers(self) -> None:
        """Runs due timers, crontab jobs and startup tasks, only in the child the
        supervisor chose (one in the group)."""
        if not self.runs_timers or not self.tasks:
            return
        now = time.monotonic()
        for timer in self.app.timers:
            due = self._timer_due.setdefault(timer.name, now + timer.interval)
            if now < due:
                continue
            self._timer_due[timer.name] = now + timer.interval
            self._run_job(timer.name, timer.fn)
        wall = time.time()
        if self.jobs.pending(wall):
            # a stop sent before ``wall`` is read before firing: no two children fire one
            # crontab time (DESIGN.md, "Timers, crontab and tasks")
            generation = self.jobs.generation
            self.handle_control(timeout=0)
            if (self.jobs.generation == generation and self.runs_timers and self.tasks
                    and not self.stopping):
                for job in self.jobs.take(wall):
                    self._run_job(job.name, functools.partial(job.call, self.app))
        self.committer.poll()

    def _run_job(self, name: str, fn: Any) -> None:
        self.committer.before_timers(self.tasks)
        try:
            result = fn()
            if asyncio.iscoroutine(result):
                assert self.loop is not None
                self.loop.run_until_complete(result)
        except Exception:  # noqa: BLE001 - a timer's failure is logged, not fatal
            log.exception("timer %s failed", name)
