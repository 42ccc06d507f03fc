"""Test app for failed tasks: a record makes the agent raise for as long as a file it
names exists (the test decides when the task may recover); a timer appends the pid of
the child that runs it to a file, so a test sees which child owns the timers.  With
``SHARDSUP_TEST_CRON_FILE``, a crontab job every 2 s and a startup task write theirs."""
import os
import time

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
TIMER_FILE = os.environ.get("SHARDSUP_TEST_TIMER_FILE")

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2)
source = app.topic(f"{P}-in", partitions=4, value_serializer="json")
sink = app.topic(f"{P}-out", partitions=4, value_serializer="json")


@app.agent(source, sink=[sink], on_error="crash")
async def work(stream):
    async for value in stream:
        poison = value.get("fail_while")
        if poison and os.path.exists(poison):
            raise RuntimeError(f"poison record {value['n']} ({poison} exists)")
        yield {"n": value["n"], "pid": os.getpid()}


if TIMER_FILE:
    @app.timer(0.2)
    def beat() -> None:
        with open(TIMER_FILE, "a") as f:
            f.write(f"{os.getpid()}\n")


CRON_FILE = os.environ.get("SHARDSUP_TEST_CRON_FILE")

if CRON_FILE:
    @app.crontab("*/2 * * * * *")  # every 2 s (six fields: seconds first)
    def every_two_seconds() -> None:
        # the scheduled time: the even second this fire is for (it runs at or just after it)
        with open(CRON_FILE, "a") as f:
            f.write(f"cron {os.getpid()} {int(time.time()) // 2 * 2}\n")

    @app.task
    async def started() -> None:
        with open(CRON_FILE, "a") as f:
            f.write(f"task {os.getpid()}\n")
