"""Test app for supervision: records can ask the agent to hang, die, or start a
double-forked daemon; every output says which process produced it and when."""
import os
import subprocess
import time

import shardworker

P = os.environ["SHARDSUP_TEST_PREFIX"]
WORK_SECONDS = float(os.environ.get("SHARDSUP_TEST_WORK_US", "0")) / 1e6

app = shardworker.App(P, broker="kafka://127.0.0.1:9092", session_timeout_ms=6000,
                      commit_interval=0.2)
source = app.topic(f"{P}-in", partitions=4, value_serializer="json")
sink = app.topic(f"{P}-out", partitions=4, value_serializer="json")


def first_time(marker: str) -> bool:
    """True once per marker file: actions survive redelivery after a restart."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def hang_forever() -> None:
    time.sleep(10**6)


def start_daemon(seconds: str) -> None:
    """The classic double fork: the sleep's parent exits at once, so it is orphaned."""
    subprocess.run(["sh", "-c", f"(sleep {seconds} >/dev/null 2>&1 &)"], check=True)


@app.agent(source, sink=[sink], on_error="crash")
async def work(stream):
    async for value in stream:
        if value.get("hang") and first_time(value["hang"]):
            hang_forever()
        if value.get("hang_always"):
            hang_forever()
        if value.get("daemon") and first_time(value["daemon_marker"]):
            start_daemon(value["daemon"])
        if value.get("die"):
            os._exit(7)
        if WORK_SECONDS:
            until = time.perf_counter() + WORK_SECONDS
            while time.perf_counter() < until:
                pass
        yield {"n": value["n"], "pid": os.getpid(), "t": time.time()}
