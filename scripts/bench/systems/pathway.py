"""Pathway as a peer, the reference for a Rust engine (runs in the peers' virtualenv:
``python -m bench.systems.pathway``).

Its Kafka connector in streaming mode (``pw.io.kafka.read``, format ``raw``: columns
``key`` and ``data``, autocommit every 100 ms instead of 1.5 s).
stateless: a Python UDF (``pw.apply``): ``json.loads`` → ``work.timed_result`` →
``json.dumps``, written to the output topic with ``pw.io.kafka.write`` (format ``raw``);
the UDF counts the records and writes the stats after the N-th.  Pathway writes its
outputs in batches after processing them, so the rate is timed from the first record
processed (its clock) to the last output's CreateTime.
stateful: ``groupby(key).reduce(count, sum(amount))`` (the amount parsed by Pathway's
``pw.this.data`` → a UDF ``json.loads``), watched with ``pw.io.subscribe``: the process
counts the records the reduced counts account for and writes its stats when they reach N
(its own clock: first record parsed → the update that makes N).  After that the benchmark
stops it (SIGTERM)."""
import json
import os

from ..work import timed_result
from .peerlib import Progress, parse_args


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    os.environ.setdefault("PATHWAY_TELEMETRY_LEVEL", "none")
    os.environ.setdefault("PATHWAY_MONITORING_SERVER", "")
    import pathway as pw

    settings = {"bootstrap.servers": args.bootstrap, "group.id": f"{args.prefix}-pathway",
                "auto.offset.reset": "earliest", "session.timeout.ms": "6000"}
    table = pw.io.kafka.read(settings, f"{args.prefix}-in", format="raw",
                             autocommit_duration_ms=100, autogenerate_key=True)
    progress = Progress(args.records, args.keys)
    loads = json.loads
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    if args.workload == "stateless":
        def process(data: bytes) -> bytes:
            out = dumps(timed_result(loads(data))).encode()
            progress.record()
            return out

        out = table.select(key=pw.this.key, data=pw.apply_with_type(process, bytes, pw.this.data))
        pw.io.kafka.write(out, {"bootstrap.servers": args.bootstrap}, f"{args.prefix}-out",
                          format="raw", key=out.key, value=out.data)
    else:
        def parse(data: bytes) -> int:
            if progress.first is None:  # the clock starts at the first record parsed
                progress.first = _now()
            return loads(data)["amount"]

        def key_of(key: bytes) -> str:
            return key.decode()

        rows = table.select(user=pw.apply_with_type(key_of, str, pw.this.key),
                            amount=pw.apply_with_type(parse, int, pw.this.data))
        totals = rows.groupby(pw.this.user).reduce(
            pw.this.user, count=pw.reducers.count(), total=pw.reducers.sum(pw.this.amount))
        current = {}
        seen = [0]

        def on_change(key, row, time, is_addition) -> None:  # noqa: ANN001
            if not is_addition:
                return
            user, c = row["user"], row["count"]
            seen[0] += c - current.get(user, 0)
            current[user] = c
            progress.final[user] = [c, row["total"]]
            progress.seen = seen[0]
            progress.points.append((_now(), seen[0]))
            if seen[0] >= args.records and not progress.done:
                progress.finish()

        pw.io.subscribe(totals, on_change=on_change)
    pw.run(monitoring_level=pw.MonitoringLevel.NONE)


def _now() -> float:
    import time

    return time.time()


if __name__ == "__main__":
    main()
