"""``@app.crontab`` and ``@app.task`` (issue 14, point 7): the cron expression parser, next
fire times (month ends, day-of-month/day-of-week, a daylight saving change), the jobs of
the child holding the timers role, and the worker reading a stop before it fires.
Pure logic: no broker, no processes."""
from __future__ import annotations

import signal
import socket
from datetime import datetime, timezone
from typing import Iterator, List, Optional

import pytest

from shardworker import App
from shardworker.crontab import (CronError, CronExpression, Crontab, ScheduledJobs,
                                 StartupTask, resolve_zone)
from shardworker.protocol import Channel, Timers
from shardworker.worker import Worker

UTC = timezone.utc


def fires(expr: str, start: datetime, count: int, zone: str = "UTC") -> List[str]:
    """The next ``count`` fire times after ``start``, as ISO text on ``zone``'s clock."""
    tz = resolve_zone(zone)
    parsed, t, out = CronExpression.parse(expr), start.timestamp(), []
    for _ in range(count):
        nxt: Optional[float] = parsed.next_fire(t, tz)
        assert nxt is not None
        out.append(datetime.fromtimestamp(nxt, tz).isoformat())
        t = nxt
    return out


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- parsing ------------------------------------------------------------------------------
def test_fields_allow_stars_lists_ranges_steps_and_names() -> None:
    e = CronExpression.parse("*/15 9-17/4 1,15 jan-mar mon-fri")
    assert e.seconds == {0} and e.minutes == {0, 15, 30, 45}
    assert e.hours == {9, 13, 17} and e.days == {1, 15}
    assert e.months == {1, 2, 3} and e.weekdays == {1, 2, 3, 4, 5}
    assert CronExpression.parse("0 0 * * 7").weekdays == {0}          # Sunday is 7 too
    assert CronExpression.parse("0 0 * * SUN,sat").weekdays == {0, 6}
    six = CronExpression.parse("*/2 * * * * *")                       # seconds first
    assert six.seconds == set(range(0, 60, 2)) and six.minutes == set(range(60))
    assert CronExpression.parse("@daily").hours == {0}


@pytest.mark.parametrize("text, says", [
    ("* * * *", "5 fields"), ("* * * * * * *", "5 fields"),
    ("60 * * * *", "minute"), ("* 24 * * *", "hour"), ("* * 0 * *", "day of month"),
    ("* * * 13 *", "month"), ("* * * * 8", "day of week"), ("*/0 * * * *", "step"),
    ("5-1 * * * *", "backwards"), ("x * * * *", "not a number"), ("5/2 * * * *", "a step needs"),
    ("* * * foo *", "jan"), ("0 0 30 2 *", "never fires"),
])
def test_bad_expressions_name_the_field_at_fault(text: str, says: str) -> None:
    with pytest.raises(CronError, match=says):
        CronExpression.parse(text)


def test_app_crontab_rejects_a_bad_expression_or_zone_at_declaration() -> None:
    app = App("c")
    with pytest.raises(CronError):
        app.crontab("61 * * * *")
    with pytest.raises(Exception):
        app.crontab("* * * * *", timezone="Nowhere/Atlantis")


# -- next fire times -------------------------------------------------------------------------
def test_every_five_minutes_is_strictly_after_the_given_time() -> None:
    assert fires("*/5 * * * *", utc(2024, 1, 1, 0, 3, 59), 3) == [
        "2024-01-01T00:05:00+00:00", "2024-01-01T00:10:00+00:00", "2024-01-01T00:15:00+00:00"]
    assert fires("*/5 * * * *", utc(2024, 1, 1, 0, 5), 1) == ["2024-01-01T00:10:00+00:00"]
    assert fires("*/5 * * * *", utc(2024, 12, 31, 23, 58), 1) == ["2025-01-01T00:00:00+00:00"]


def test_a_range_with_a_step() -> None:
    assert fires("10-40/15 8-10/2 * * *", utc(2024, 5, 1, 8, 30), 5) == [
        "2024-05-01T08:40:00+00:00", "2024-05-01T10:10:00+00:00", "2024-05-01T10:25:00+00:00",
        "2024-05-01T10:40:00+00:00", "2024-05-02T08:10:00+00:00"]


def test_month_ends_skip_months_without_the_day() -> None:
    assert fires("0 12 31 * *", utc(2024, 1, 31, 13), 3) == [
        "2024-03-31T12:00:00+00:00", "2024-05-31T12:00:00+00:00", "2024-07-31T12:00:00+00:00"]
    assert fires("0 0 29 2 *", utc(2024, 3, 1), 2) == [
        "2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00"]
    assert fires("0 0 1 * *", utc(2024, 2, 29, 23, 59), 1) == ["2024-03-01T00:00:00+00:00"]


def test_day_of_month_and_day_of_week_follow_vixie_crons_or_rule() -> None:
    # both restricted: the 1st, the 15th, or any Monday (2024-01-01 is a Monday)
    assert fires("0 0 1,15 * mon", utc(2024, 1, 1), 5) == [
        "2024-01-08T00:00:00+00:00", "2024-01-15T00:00:00+00:00", "2024-01-22T00:00:00+00:00",
        "2024-01-29T00:00:00+00:00", "2024-02-01T00:00:00+00:00"]
    # day-of-month '*': weekdays only; a '*'-led step counts as '*': both must match
    assert fires("0 0 * * fri", utc(2024, 1, 1), 2) == [
        "2024-01-05T00:00:00+00:00", "2024-01-12T00:00:00+00:00"]
    assert fires("0 0 */2 * fri", utc(2024, 1, 1), 2) == [
        "2024-01-05T00:00:00+00:00", "2024-01-19T00:00:00+00:00"]


def test_seconds_field_fires_every_two_seconds() -> None:
    assert fires("*/2 * * * * *", utc(2024, 3, 1, 0, 0, 0), 3) == [
        "2024-03-01T00:00:02+00:00", "2024-03-01T00:00:04+00:00", "2024-03-01T00:00:06+00:00"]
    parsed = CronExpression.parse("*/2 * * * * *")
    assert parsed.next_fire(utc(2024, 3, 1, 0, 0, 1).timestamp() + 0.5, UTC) == utc(
        2024, 3, 1, 0, 0, 2).timestamp()


def test_timezone_reads_the_fields_on_the_zones_clock() -> None:
    assert fires("0 9 * * *", utc(2024, 1, 1), 1, "Europe/Berlin") == ["2024-01-01T09:00:00+01:00"]
    assert fires("0 9 * * *", utc(2024, 7, 1), 1, "Europe/Berlin") == ["2024-07-01T09:00:00+02:00"]


def test_berlin_spring_forward() -> None:
    """2024-03-31 02:00 CET the clocks jump to 03:00 CEST."""
    start = datetime(2024, 3, 31, 1, 50, tzinfo=resolve_zone("Europe/Berlin"))
    # every hour allowed: real time goes on, the skipped wall times just do not happen
    assert fires("*/5 * * * *", start, 3, "Europe/Berlin") == [
        "2024-03-31T01:55:00+01:00", "2024-03-31T03:00:00+02:00", "2024-03-31T03:05:00+02:00"]
    # a fixed time in the skipped hour fires when the clocks jump, once, then as usual
    assert fires("30 2 * * *", start, 3, "Europe/Berlin") == [
        "2024-03-31T03:00:00+02:00", "2024-04-01T02:30:00+02:00", "2024-04-02T02:30:00+02:00"]
    # a fixed time outside the gap is unaffected
    assert fires("0 4 * * *", start, 1, "Europe/Berlin") == ["2024-03-31T04:00:00+02:00"]


def test_berlin_fall_back() -> None:
    """2024-10-27 03:00 CEST the clocks go back to 02:00 CET: 02:xx happens twice."""
    start = datetime(2024, 10, 27, 1, 50, tzinfo=resolve_zone("Europe/Berlin"))
    # every hour allowed: both passes (every 20 minutes of real time)
    assert fires("*/20 * * * *", start, 7, "Europe/Berlin") == [
        "2024-10-27T02:00:00+02:00", "2024-10-27T02:20:00+02:00", "2024-10-27T02:40:00+02:00",
        "2024-10-27T02:00:00+01:00", "2024-10-27T02:20:00+01:00", "2024-10-27T02:40:00+01:00",
        "2024-10-27T03:00:00+01:00"]
    # a fixed time fires once, in the first pass
    assert fires("30 2 * * *", start, 2, "Europe/Berlin") == [
        "2024-10-27T02:30:00+02:00", "2024-10-28T02:30:00+01:00"]


# -- the jobs of the child with the timers role ----------------------------------------------
def jobs_of(expr: str = "*/2 * * * * *") -> ScheduledJobs:
    crontab = Crontab(lambda: None, CronExpression.parse(expr), UTC, "every2")
    return ScheduledJobs([crontab], [StartupTask(lambda: None, "hello")])


def test_nothing_is_due_without_the_role() -> None:
    jobs = jobs_of()
    assert not jobs.pending(1e9) and jobs.take(1e9) == []


def test_startup_tasks_run_once_per_process_and_crontabs_start_after_the_role_came() -> None:
    jobs = jobs_of()
    jobs.role(True, 1000.5)
    assert jobs.pending(1000.5)
    assert [j.name for j in jobs.take(1000.5)] == ["hello"]  # 1000 was before the role
    assert not jobs.pending(1001.9) and jobs.pending(1002.0)
    assert [j.name for j in jobs.take(1002.0)] == ["every2"]
    # times missed (a long batch) are skipped, not caught up
    assert [j.name for j in jobs.take(1009.0)] == ["every2"] and not jobs.pending(1009.9)
    jobs.role(False, 1010.0)
    assert not jobs.pending(1012.0)
    jobs.role(True, 1012.0)       # the role came back: the startup task has run already
    assert not jobs.pending(1012.0) and [j.name for j in jobs.take(1014.0)] == ["every2"]


def test_two_holders_one_after_the_other_never_fire_one_time_twice() -> None:
    old, new = jobs_of(), jobs_of()
    old.role(True, 1000.0)
    old.take(1000.0)
    new.role(True, 1003.0)     # the supervisor told old to stop just before, at 1003
    assert [j.name for j in old.take(1004.0)] == ["every2"]  # old fired 1004 (stop unread)
    new.take(1003.0)
    assert not new.pending(1003.9) and new.pending(1004.0)   # only what follows the role
    # which is why the worker reads its messages before firing (see the worker test below)


def test_app_declares_crontabs_and_startup_tasks() -> None:
    app = App("c")
    assert not app.has_scheduled_work

    @app.crontab("*/5 * * * *", timezone="Europe/Berlin")
    def every_five() -> None: ...

    @app.task
    async def on_start() -> None: ...

    @app.task(name="with_app")
    def takes(app_: App) -> None: ...

    assert app.has_scheduled_work
    assert [c.name for c in app.crontabs] == ["every_five"]
    assert str(app.crontabs[0].zone) == "Europe/Berlin"
    assert [(t.name, t.takes_app) for t in app.startup_tasks] == [("on_start", False),
                                                                   ("with_app", True)]
    assert App("d").crontab("* * * * *")(every_five) is every_five  # the function itself
    assert App("e").crontabs == [] and resolve_zone(None) is UTC


# -- the worker: reads a stop before firing ----------------------------------------------------
@pytest.fixture
def cron_worker() -> Iterator[tuple]:
    """A set-up worker whose app has a crontab job and a startup task that record their
    calls, with the supervisor's end of a real socketpair channel."""
    app = App("cw", broker="kafka://127.0.0.1:9")
    calls: List[str] = []

    @app.crontab("* * * * * *")
    def tick() -> None:
        calls.append("tick")

    @app.task
    async def hello(app_: App) -> None:
        calls.append(f"hello {app_.id}")

    ours, theirs = socket.socketpair()
    previous = signal.getsignal(signal.SIGTERM)
    worker = Worker(app, channel=Channel(theirs), bootstrap="127.0.0.1:9", index=0)
    worker.setup()
    worker.tasks = ["0_0"]
    try:
        yield worker, Channel(ours), calls
    finally:
        worker.ticker.stop()  # type: ignore[union-attr]
        worker.consumer.close()
        signal.signal(signal.SIGTERM, previous)
        ours.close()
        theirs.close()


@pytest.mark.timeout(20)
def test_the_worker_runs_due_jobs_only_with_the_role(cron_worker: tuple) -> None:
    worker, supervisor, calls = cron_worker
    worker.jobs.role(True, 0.0)   # a role without the message: due jobs stay unrun
    worker.run_timers()
    assert calls == []
    worker.jobs.role(False, 0.0)
    supervisor.send(Timers(True))
    worker.handle_control(timeout=1.0)
    assert worker.runs_timers and worker.jobs.active
    worker.jobs._next = {0: 1.0}  # due long ago
    worker.run_timers()
    assert calls == ["hello cw", "tick"]


@pytest.mark.timeout(20)
def test_the_worker_reads_a_stop_sent_before_it_fires(cron_worker: tuple) -> None:
    worker, supervisor, calls = cron_worker
    supervisor.send(Timers(True))
    worker.handle_control(timeout=1.0)
    worker.jobs._next = {0: 1.0}
    supervisor.send(Timers(False))  # unread when the job comes due
    worker.run_timers()
    assert calls == [] and not worker.runs_timers and not worker.jobs.active
