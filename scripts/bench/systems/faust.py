"""faust-streaming as a peer (runs in the peers' virtualenv: ``python -m bench.systems.faust``).

stateless: an agent over the input topic (raw bytes): ``json.loads`` →
``work.timed_result`` → ``json.dumps`` → ``await out.send(key, value)`` to the output topic.
stateful: two tables (``app.Table("counts", default=int)``, ``"sums"``) in RocksDB
(rocksdict; memory if it is missing), with their changelog topics, updated per record as
``counts[key] += 1``, ``sums[key] += amount``.  App id ``<prefix>-faust``, the web server
off, session timeout 6 s (as the shardsup apps), the defaults otherwise.  After the N-th record the process writes its stats; the
benchmark then stops it (SIGTERM)."""
import json
import os
import sys

from ..work import timed_result
from .peerlib import Progress, parse_args


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    import faust

    import importlib.util

    store = "rocksdb://" if importlib.util.find_spec("rocksdict") else "memory://"
    app = faust.App(f"{args.prefix}-faust", broker=f"kafka://{args.bootstrap}", store=store,
                    datadir=os.path.join(args.workdir, "faust-data"),
                    topic_partitions=args.partitions, web_enabled=False,
                    consumer_auto_offset_reset="earliest",
                    broker_session_timeout=6.0)  # as the shardsup apps (tansu's join delay)
    source = app.topic(f"{args.prefix}-in", key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw",
                       partitions=args.partitions)
    progress = Progress(args.records, args.keys)
    loads = json.loads
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    if args.workload == "stateless":
        sink = app.topic(f"{args.prefix}-out", key_type=bytes, value_type=bytes,
                         key_serializer="raw", value_serializer="raw",
                         partitions=args.partitions)

        @app.agent(source)
        async def process(stream):  # noqa: ANN001
            async for key, value in stream.items():
                await sink.send(key=key, value=dumps(timed_result(loads(value))).encode())
                progress.record()
    else:
        counts = app.Table("counts", default=int, partitions=args.partitions)
        sums = app.Table("sums", default=int, partitions=args.partitions)

        @app.agent(source)
        async def count(stream):  # noqa: ANN001
            async for key, value in stream.items():
                record = loads(value)
                k = key.decode()
                counts[k] += 1
                sums[k] += record["amount"]
                progress.record(record["n"], k, counts[k], sums[k])

    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()


if __name__ == "__main__":
    main()
