"""``@app.crontab`` and ``@app.task``: cron expressions, their next fire times (across
daylight saving changes), and the jobs the child holding the timers role runs.

Both run where ``@app.timer`` runs: in the one child of the group the supervisor tells
to run timers (DESIGN.md, "Timers, crontab and tasks").  Nothing here talks to the
supervisor or Kafka; :class:`ScheduledJobs` is driven by ``Worker.run_timers``.

Expressions have Vixie cron's five fields (minute hour day-of-month month day-of-week),
or six with seconds first (an extension, so that tests need not wait minutes).  A field
is ``*``, a number, a range ``a-b``, either with a step (``*/n``, ``a-b/n``), or a
comma-separated list of those; months and weekdays also take names (``jan``, ``mon``).
Day-of-month and day-of-week follow Vixie cron: when both are restricted (neither starts
with ``*``) a day matches either; otherwise it must match both.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

#: a zone name (``"Europe/Berlin"``) or a tzinfo; None is UTC (Faust's default ``timezone``)
Zone = Union[str, tzinfo, None]

_EPOCH = datetime(1970, 1, 1)
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
#: (name, lowest, highest, names from ``lowest`` on)
_FIELDS: Tuple[Tuple[str, int, int, Sequence[str]], ...] = (
    ("second", 0, 59, ()), ("minute", 0, 59, ()), ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()), ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _WEEKDAYS))
_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
            "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
            "@hourly": "0 * * * *"}
#: a schedule that matches no wall time within this many years never does (Feb 29 recurs
#: within 8 years, even across a century that is not a leap year)
_SEARCH_YEARS = 9
_DAY = 86400


class CronError(ValueError):
    """A cron expression that cannot be parsed, or that never fires."""


def _value(text: str, low: int, names: Sequence[str], what: str) -> int:
    word = text.lower()
    if word in names:
        return low + list(names).index(word)
    if not text.isdigit():
        raise CronError(f"{what}: {text!r} is not a number" + (
            f" or a name ({', '.join(names)})" if names else ""))
    return int(text)


def _parse_field(text: str, index: int) -> FrozenSet[int]:
    what, low, high, names = _FIELDS[index]
    values = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{what}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if span == "*":
            first, last = low, high
        elif "-" in span:
            a, _, b = span.partition("-")
            first, last = _value(a, low, names, what), _value(b, low, names, what)
        elif step_text:
            raise CronError(f"{what}: a step needs '*' or a range before it, not {span!r}")
        else:
            first = last = _value(span, low, names, what)
        if not low <= first <= last <= high:
            raise CronError(f"{what}: {part!r} is not within {low}-{high} (or is backwards)")
        values.update(range(first, last + 1, step))
    if index == 5 and 7 in values:  # Sunday is 0 and 7
        values = (values - {7}) | {0}
    return frozenset(values)


@dataclass(frozen=True)
class CronExpression:
    """A parsed cron expression: the values each field allows."""

    text: str
    seconds: FrozenSet[int]
    minutes: FrozenSet[int]
    hours: FrozenSet[int]
    days: FrozenSet[int]
    months: FrozenSet[int]
    weekdays: FrozenSet[int]       # 0 = Sunday
    day_star: bool                 # the day-of-month field starts with '*'
    weekday_star: bool

    @classmethod
    def parse(cls, text: str) -> "CronExpression":
        """Parses five fields (or six, seconds first; or an alias such as ``@daily``);
        raises :class:`CronError` naming the field at fault."""
        fields = _ALIASES.get(text.strip().lower(), text).split()
        if len(fields) == 5:
            fields = ["0"] + fields
        elif len(fields) != 6:
            raise CronError(f"cron expression {text!r}: 5 fields (minute hour day month "
                            "weekday) or 6 (seconds first) expected")
        try:
            sets = [_parse_field(f, i) for i, f in enumerate(fields)]
        except CronError as exc:
            raise CronError(f"cron expression {text!r}: {exc}") from None
        expr = cls(text, *sets, day_star=fields[3].startswith("*"),
                   weekday_star=fields[5].startswith("*"))
        if expr.next_wall(datetime(2000, 1, 1), inclusive=True) is None:
            raise CronError(f"cron expression {text!r} never fires")
        return expr

    @property
    def follows_real_time(self) -> bool:
        """Every hour allowed: in a repeated hour (clocks going back) it fires in both
        passes, and nothing of it falls into a skipped hour alone (see :meth:`next_fire`)."""
        return len(self.hours) == 24

    def day_matches(self, day: datetime) -> bool:
        """Vixie cron's rule: either day field when both are restricted, else both."""
        dom = day.day in self.days
        dow = day.isoweekday() % 7 in self.weekdays
        return (dom and dow) if (self.day_star or self.weekday_star) else (dom or dow)

    def next_wall(self, start: datetime, inclusive: bool) -> Optional[datetime]:
        """The first wall-clock time (naive, whole seconds) the fields allow at or after
        (``inclusive``) or after ``start``; None when there is none for years."""
        t = start.replace(microsecond=0)
        if not inclusive or start.microsecond:
            t += timedelta(seconds=1)
        limit = t.year + _SEARCH_YEARS
        while t.year < limit:
            if t.month not in self.months:
                later = [m for m in self.months if m > t.month]
                t = datetime(t.year, later[0], 1) if later else datetime(t.year + 1, min(self.months), 1)
            elif not self.day_matches(t):
                t = datetime(t.year, t.month, t.day) + timedelta(days=1)
            elif t.hour not in self.hours:
                later = sorted(h for h in self.hours if h > t.hour)
                t = (t.replace(hour=later[0], minute=0, second=0) if later
                     else datetime(t.year, t.month, t.day) + timedelta(days=1))
            elif t.minute not in self.minutes:
                later = sorted(m for m in self.minutes if m > t.minute)
                t = (t.replace(minute=later[0], second=0) if later
                     else t.replace(minute=0, second=0) + timedelta(hours=1))
            elif t.second not in self.seconds:
                later = sorted(s for s in self.seconds if s > t.second)
                t = (t.replace(second=later[0]) if later
                     else t.replace(second=0) + timedelta(minutes=1))
            else:
                return t
        return None

    def next_fire(self, after: float, zone: tzinfo) -> Optional[float]:
        """The first instant (epoch seconds) strictly after ``after`` at which the job
        fires, its fields read on ``zone``'s wall clock.

        Where the clocks change: a job that allows every hour follows real time (every
        wall time that happens fires, a repeated one twice); any other job fires once per
        wall time, in the first pass of a repeated hour, and a time the clocks skip fires
        at the instant they jump (Vixie cron's rule for fixed-time jobs).
        """
        cur = math.floor(after)
        inclusive = False
        for _ in range(4 * _SEARCH_YEARS + 8):  # a few zone offsets per year at most
            offset = _offset(zone, cur)
            wall = self.next_wall(_EPOCH + timedelta(seconds=cur + offset), inclusive)
            if wall is None:
                return None
            candidate = int((wall - _EPOCH).total_seconds()) - offset
            change = _first_change(zone, cur, candidate, offset)
            if change is None:
                return float(candidate)
            new_offset = _offset(zone, change)
            before = _EPOCH + timedelta(seconds=change + offset)  # the wall clock's last reading
            if not self.follows_real_time:
                if new_offset > offset:  # skipped wall times [before, after the jump)
                    skipped = self.next_wall(before, inclusive=True)
                    if skipped is not None and skipped < before + timedelta(seconds=new_offset - offset):
                        return float(change)
                elif new_offset < offset:  # repeated wall times: their first pass is over
                    cur, inclusive = change + (offset - new_offset), True
                    continue
            cur, inclusive = change, True
        return None


def _offset(zone: tzinfo, instant: int) -> int:
    delta = datetime.fromtimestamp(instant, zone).utcoffset()
    return int(delta.total_seconds()) if delta is not None else 0


def _first_change(zone: tzinfo, start: int, end: int, offset: int) -> Optional[int]:
    """The first instant in (start, end] whose UTC offset is not ``offset``: probed a day
    at a time (zones change offsets months apart), then found to the second."""
    if isinstance(zone, timezone):
        return None  # a fixed offset never changes
    low = start
    while low < end:
        high = min(low + _DAY, end)
        if _offset(zone, high) != offset:
            while high - low > 1:
                mid = (low + high) // 2
                if _offset(zone, mid) != offset:
                    high = mid
                else:
                    low = mid
            return high
        low = high
    return None


def resolve_zone(zone: Zone) -> tzinfo:
    """A tzinfo for ``zone``: a name from the tz database (``zoneinfo``; the ``tzdata``
    package supplies one where the system has none), a tzinfo as is, None for UTC."""
    if zone is None:
        return timezone.utc
    if isinstance(zone, tzinfo):
        return zone
    from zoneinfo import ZoneInfo

    return ZoneInfo(zone)


@dataclass
class Crontab:
    """A function run at the times of a cron expression, in the one child of the group
    that runs timers."""

    fn: Callable[[], Any]
    expression: CronExpression
    zone: tzinfo
    name: str

    def next_fire(self, after: float) -> Optional[float]:
        return self.expression.next_fire(after, self.zone)

    def call(self, app: Any) -> Any:
        return self.fn()


@dataclass
class StartupTask:
    """A function run once by each process that gets the timers role, when it gets it
    (Faust's ``@app.task``); it is passed the app when it takes an argument."""

    fn: Callable[..., Any]
    name: str
    takes_app: bool = field(init=False)

    def __post_init__(self) -> None:
        params = [p for p in inspect.signature(self.fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
        self.takes_app = bool(params)

    def call(self, app: Any) -> Any:
        return self.fn(app) if self.takes_app else self.fn()


Job = Union[Crontab, StartupTask]


class ScheduledJobs:
    """The crontab jobs and startup tasks of one child: idle until the supervisor gives
    it the timers role (:meth:`role`).  A job's first fire is the first of its times
    strictly after the role arrived, so of two children that hold the role one after the
    other, only one fires a given time (DESIGN.md, "Timers, crontab and tasks")."""

    def __init__(self, crontabs: Sequence[Crontab], tasks: Sequence[StartupTask]) -> None:
        self.crontabs = list(crontabs)
        self.tasks = list(tasks)
        self.active = False
        #: counts role changes: a fire decided before one is not made after it
        self.generation = 0
        self._next: Dict[int, Optional[float]] = {}  # by position in crontabs
        self._tasks_done = False

    def __bool__(self) -> bool:
        return bool(self.crontabs or self.tasks)

    @property
    def needs_loop(self) -> bool:
        """Some job is a coroutine function (the child needs an event loop)."""
        return any(inspect.iscoroutinefunction(job.fn) for job in (*self.crontabs, *self.tasks))

    def role(self, run: bool, now: float) -> None:
        """The supervisor gave (``run``) or took the timers role at ``now`` (epoch)."""
        if run == self.active:
            return
        self.active = run
        self.generation += 1
        self._next = ({i: c.next_fire(now) for i, c in enumerate(self.crontabs)}
                      if run else {})

    def pending(self, now: float) -> bool:
        """Something is due at ``now``: a startup task not run yet, or a crontab time."""
        if not self.active:
            return False
        return (not self._tasks_done and bool(self.tasks)) or any(
            t is not None and t <= now for t in self._next.values())

    def take(self, now: float) -> List[Job]:
        """The jobs to run now (startup tasks first, once per process), each crontab's
        next time moved past ``now`` (times missed meanwhile are skipped, not caught up)."""
        if not self.active:
            return []
        jobs: List[Job] = []
        if not self._tasks_done:
            jobs.extend(self.tasks)
            self._tasks_done = True
        for i, crontab in enumerate(self.crontabs):
            due = self._next.get(i)
            if due is not None and due <= now:
                jobs.append(crontab)
                self._next[i] = crontab.next_fire(now)
        return jobs
