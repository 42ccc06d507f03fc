"""Quix Streams as a peer (runs in the peers' virtualenv: ``python -m bench.systems.quix``).

stateless: a StreamingDataFrame over the input topic (bytes in): ``json.loads`` →
``work.timed_result`` → ``json.dumps`` → ``to_topic`` the output topic with the input's key (the output's
timestamp set to the time of processing: Quix would copy the input's).
stateful: ``apply(..., stateful=True)``: count and sum per message key in Quix's State
(RocksDB, with its changelog topics), as ``state.get``/``state.set``.  Session timeout 6 s (as the
shardsup apps), the Application's defaults otherwise (at-least-once, commit_interval 5 s, consumer group ``<prefix>-quix``).
After the N-th record the process writes its stats and calls ``app.stop()``."""
import json
import logging
import os
import time

from ..work import timed_result
from .peerlib import Progress, parse_args


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    from quixstreams import Application

    app = Application(broker_address=args.bootstrap, consumer_group=f"{args.prefix}-quix",
                      auto_offset_reset="earliest", loglevel=logging.WARNING,
                      # as the shardsup apps: tansu delays a group's first join by about
                      # half the session timeout
                      consumer_extra_config={"session.timeout.ms": 6000},
                      state_dir=os.path.join(args.workdir, "quix-state"))
    source = app.topic(f"{args.prefix}-in", key_deserializer="bytes", value_deserializer="bytes")
    sdf = app.dataframe(source)
    progress = Progress(args.records, args.keys)
    loads = json.loads
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    if args.workload == "stateless":
        sink = app.topic(f"{args.prefix}-out", key_serializer="bytes", value_serializer="bytes")

        def process(value: bytes) -> bytes:
            out = dumps(timed_result(loads(value))).encode()
            if progress.record():
                app.stop()
            return out

        sdf = sdf.apply(process)
        # Quix gives an output the input's timestamp; the benchmark times outputs by
        # their CreateTime, so it is set to the time of processing (as produce() would)
        sdf = sdf.set_timestamp(lambda _v, _k, _ts, _h: int(time.time() * 1000))
        sdf.to_topic(sink)
    else:
        def count(value: bytes, key: bytes, _ts: int, _headers, state) -> None:  # noqa: ANN001
            record = loads(value)
            c = state.get("count", 0) + 1
            s = state.get("sum", 0) + record["amount"]
            state.set("count", c)
            state.set("sum", s)
            if progress.record(record["n"], key.decode(), c, s):
                app.stop()

        sdf = sdf.update(count, stateful=True, metadata=True)
    app.run()


if __name__ == "__main__":
    main()
