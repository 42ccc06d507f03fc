"""The ``shardsup`` command line: start, send.  Errors are one line and a non-zero exit."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

import click

from shardworker import __version__
from shardworker.app import EMBEDDED, App, bootstrap_servers
from shardworker.loader import AppNotFound, load_app
from shardworker.logs import redirect_output, setup_logging

from .errors import UsageError

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False)


def fail(message: str, code: int = 2) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
    click.echo(f"shardsup: error: {message}", err=True)
    sys.exit(code)


def load(spec: str) -> App:
    try:
        return load_app(spec)
    except AppNotFound as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the user's module raised on import
        fail(f"importing app module {spec.partition(':')[0]!r} failed: {type(exc).__name__}: {exc}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="shardsup")
def cli() -> None:
    """shardsup: stream processing for Python on every core.

    A supervisor joins the Kafka consumer group and runs one child process per group of
    partitions, restarting them when they crash, with offsets committed only for work
    whose outputs the broker has acknowledged.
    """


class SectionedCommand(click.Command):
    """A command whose ``--help`` lists its options in sections, as Faust's worker does
    (``sections``: title → option names, in order; the rest under "Other options")."""

    sections: Dict[str, List[str]] = {}

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        params = {p.name: p for p in self.get_params(ctx)}
        sections = list(self.sections.items())
        sections.append(("Other options", [n for n in params if not any(
            n in names for _t, names in sections)]))
        for title, names in sections:
            rows = [params[n].get_help_record(ctx) for n in names if n in params]
            rows = [r for r in rows if r]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


@cli.command(cls=SectionedCommand)
@click.option("-A", "--app", "app_spec", required=True, metavar="MODULE[:ATTR]",
              help="The app: a module with one shardworker.App, or module:attribute.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=None,
              help="Most child processes to run (default: the number of CPUs).")
@click.option("-l", "--loglevel", type=LOG_LEVELS, default="info", show_default=True)
@click.option("--datadir", type=click.Path(file_okay=False), default=None,
              help="Where state, the pid file and reports live (default: ./<app id>-data).")
@click.option("--broker", default=None, metavar="URL",
              help="kafka://host:port[;host:port] or embedded:// (overrides the App's broker).")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a warm shutdown may take before the children are killed.")
@click.option("--child-timeout", type=float, default=60.0, show_default=True,
              help="A child silent this long is stuck: its traceback is logged, it is killed "
                   "and restarted.")
@click.option("--max-restarts", type=click.IntRange(min=1), default=5, show_default=True,
              help="A child crashing this many times within --restart-window has its tasks "
                   "marked failed (tried again after --failed-retry).")
@click.option("--restart-window", type=float, default=60.0, show_default=True)
@click.option("--failed-retry", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              metavar="SECONDS",
              help="Failed tasks are tried again after this many seconds (or at HUP).")
@click.option("--exit-on-task-failure", is_flag=True,
              help="Shut down (exit code 3) when a task is marked failed, instead of going on.")
@click.option("--web-port", type=click.IntRange(0, 65535), default=None,
              help="Serve /status, /metrics and /health on this port (default: no web server).")
@click.option("--web-host", default="127.0.0.1", show_default=True)
@click.option("--logfile", type=click.Path(dir_okay=False), default=None,
              help="Append the logs (and the children's output) to this file, not stderr.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def start(app_spec: str, concurrency: Optional[int], loglevel: str, datadir: Optional[str],
          broker: Optional[str], shutdown_timeout: float, child_timeout: float,
          max_restarts: int, restart_window: float, failed_retry: float, exit_on_task_failure: bool,
          web_port: Optional[int], web_host: str, logfile: Optional[str], log_format: str) -> None:
    """Start a supervisor and its children; runs until TERM or INT (Ctrl-C)."""
    from .arbiter import Arbiter, make_private

    make_private()  # before the log file: it is created 0600 too
    if logfile:
        try:
            redirect_output(logfile)
        except OSError as exc:
            fail(f"cannot open log file {logfile}: {exc.strerror}")
    setup_logging("supervisor", loglevel, log_format)
    app = load(app_spec)
    if not app.agents:
        fail(f"app {app.id!r} has no agents: nothing to consume")
    try:
        app.topology  # the stream graph: its errors are said now, not in a child
    except ValueError as exc:
        fail(str(exc))
    broker = broker or os.environ.get("SHARDSUP_BROKER") or app.broker
    arbiter = Arbiter(app, app_spec, concurrency or os.cpu_count() or 1, broker,
                      datadir or f"{app.id}-data", loglevel, shutdown_timeout,
                      child_timeout, max_restarts, restart_window, exit_on_task_failure,
                      web_host, web_port, ["--log-format", log_format], failed_retry)
    try:
        code = arbiter.run()
    except UsageError as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        code = 130
    except Exception as exc:  # noqa: BLE001 - a bug or an environment we did not foresee
        logging.getLogger("supervisor").exception("supervisor failed")
        fail(f"supervisor failed: {type(exc).__name__}: {exc} (traceback in the log above)",
             code=1)
    logging.shutdown()
    sys.exit(code)


def _parse(text: Optional[str], serializer: str) -> Any:
    if text is None or serializer != "json":
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        fail(f"value is not valid JSON for a json topic: {exc}")


@cli.command()
@click.option("-A", "--app", "app_spec", required=True, metavar="MODULE[:ATTR]")
@click.option("--broker", default=None, metavar="URL", help="Overrides the App's broker.")
@click.option("-k", "--key", default=None, help="The record's key (json topics: JSON text).")
@click.option("-p", "--partition", type=int, default=None)
@click.argument("topic")
@click.argument("value", required=False)
def send(app_spec: str, broker: Optional[str], key: Optional[str], partition: Optional[int],
         topic: str, value: Optional[str]) -> None:
    """Send one record to TOPIC, encoded with the serializers the app declares for it."""
    app = load(app_spec)
    broker = broker or os.environ.get("SHARDSUP_BROKER") or app.broker
    if broker.startswith(EMBEDDED):
        fail("the app uses the embedded broker: pass --broker with the address `shardsup start` printed")
    os.environ["SHARDSUP_BROKER"] = bootstrap_servers(broker)
    declared = app.topics.get(topic)
    if declared is None:
        fail(f"app {app.id!r} declares no topic {topic!r} (declared: {', '.join(app.topics) or 'none'})")
    from .broker import check_reachable

    try:
        check_reachable(app, bootstrap_servers(broker), timeout=10)
        declared.send_soon(key=_parse(key, declared.key_serializer),
                           value=_parse(value, declared.value_serializer), partition=partition)
        app.flush(timeout=15)
    except UsageError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - one line for the user
        fail(f"send failed: {type(exc).__name__}: {exc}")
    click.echo(f"sent to {topic}")


def _datadir(datadir: Optional[str], app_spec: Optional[str]) -> str:
    if datadir:
        return datadir
    if app_spec:
        return f"{load(app_spec).id}-data"
    fail("say which supervisor: --datadir DIR or -A MODULE (for the default ./<app id>-data)")


def _running(datadir: str) -> int:
    from .pidfile import running_pid

    pid = running_pid(datadir)
    if pid is None:
        fail(f"no supervisor is running on datadir {datadir}")
    return pid


def _wait_exit(pid: int, timeout: float) -> bool:
    """True once the process has exited (a zombie waiting for its parent counts)."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@cli.command()
@click.option("--datadir", type=click.Path(file_okay=False), default=None)
@click.option("-A", "--app", "app_spec", default=None, metavar="MODULE[:ATTR]",
              help="Only to find the default datadir ./<app id>-data.")
@click.option("--cold", is_flag=True, help="Cold shutdown (QUIT): kill the children now.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the supervisor to exit.")
def stop(datadir: Optional[str], app_spec: Optional[str], cold: bool, timeout: float) -> None:
    """Stop the supervisor running on a datadir (warm, unless --cold) and wait for it."""
    import signal as signals

    pid = _running(_datadir(datadir, app_spec))
    os.kill(pid, signals.SIGQUIT if cold else signals.SIGTERM)
    if not _wait_exit(pid, timeout):
        fail(f"supervisor {pid} still running after {timeout:.0f}s", code=1)
    click.echo(f"supervisor {pid} stopped")


@cli.command()
@click.option("--datadir", type=click.Path(file_okay=False), default=None)
@click.option("-A", "--app", "app_spec", default=None, metavar="MODULE[:ATTR]",
              help="Only to find the default datadir ./<app id>-data.")
@click.option("--timeout", type=float, default=15.0, show_default=True)
def dump(datadir: Optional[str], app_spec: Optional[str], timeout: float) -> None:
    """Print the tracebacks of every thread of the supervisor and its children (USR1)."""
    import signal as signals
    import time

    from .dump import latest_dump_path

    folder = _datadir(datadir, app_spec)
    pid = _running(folder)
    path = latest_dump_path(folder)
    before = os.stat(path).st_mtime_ns if os.path.exists(path) else None
    os.kill(pid, signals.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.stat(path).st_mtime_ns != before:
            with open(path) as f:
                click.echo(f.read(), nl=False)
            return
        time.sleep(0.05)
    fail(f"supervisor {pid} wrote no report within {timeout:.0f}s", code=1)


@cli.command()
@click.option("--datadir", type=click.Path(file_okay=False), default=None)
@click.option("-A", "--app", "app_spec", default=None, metavar="MODULE[:ATTR]",
              help="Only to find the default datadir ./<app id>-data.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="Refresh every SECONDS until Ctrl-C.")
def status(datadir: Optional[str], app_spec: Optional[str], as_json: bool,
           watch: Optional[float]) -> None:
    """Show the running supervisor and one row per child (over its Unix socket)."""
    import time

    from .status import status_socket_path
    from .status import format_status, query

    path = status_socket_path(_datadir(datadir, app_spec))
    while True:
        try:
            snapshot = query(path)
        except UsageError as exc:
            fail(str(exc), code=1)
        if watch:
            click.clear()
        click.echo(json.dumps(snapshot, indent=2) if as_json else format_status(snapshot))
        if not watch:
            return
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return


@cli.command()
@click.option("-A", "--app", "app_spec", required=True, metavar="MODULE[:ATTR]")
@click.option("--datadir", type=click.Path(file_okay=False), default=None,
              help="The worker's datadir (default: ./<app id>-data).")
@click.argument("name")
@click.argument("key", required=False)
def table(app_spec: str, datadir: Optional[str], name: str, key: Optional[str]) -> None:
    """Print table NAME (or the value of KEY) as JSON, from the LMDB files of a running or
    stopped worker: LMDB lets other processes read while the worker writes."""
    from shardworker.tablecli import TableReadError, key_serializer, read_table

    app = load(app_spec)
    try:
        result = read_table(app, datadir or f"{app.id}-data", name,
                            None if key is None else _parse(key, key_serializer(app, name)))
    except TableReadError as exc:
        fail(str(exc))
    click.echo(json.dumps(result, sort_keys=True))


start.sections = {  # type: ignore[attr-defined]
    "App and broker": ["app_spec", "broker", "concurrency", "datadir"],
    "Supervision": ["shutdown_timeout", "child_timeout", "max_restarts", "restart_window",
                    "failed_retry", "exit_on_task_failure"],
    "Web server": ["web_port", "web_host"],
    "Logging": ["loglevel", "logfile", "log_format"],
    "Help": ["help"],
}


def envvar_of(option: click.Option) -> str:
    """``--shutdown-timeout`` → ``SHARDSUP_SHUTDOWN_TIMEOUT``: every option can come from
    the environment (a systemd unit's ``Environment=``, a container's), the same name in
    every command."""
    longest = max(option.opts, key=len).lstrip("-")
    return "SHARDSUP_" + longest.upper().replace("-", "_")


def _give_options_envvars(group: click.Group) -> None:
    for command in group.commands.values():
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar is None:
                param.envvar = envvar_of(param)
                param.show_envvar = True


_give_options_envvars(cli)


def main() -> None:
    cli(prog_name="shardsup")


if __name__ == "__main__":
    main()
