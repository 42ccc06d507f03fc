"""Bytewax as a peer (runs in the peers' virtualenv: ``python -m bench.systems.bytewax``).

One process, one worker (``cli_main(flow, workers_per_process=1)``), its Kafka connectors
(``KafkaSource`` over all input partitions from the beginning, ``KafkaSink``).
stateless: ``op.map``: ``json.loads`` → ``work.timed_result`` → ``json.dumps`` → a
``KafkaSinkMessage`` with the input's key.  stateful: ``op.key_on`` (the message key) →
``op.stateful_map`` keeping ``[count, sum]`` per key (Bytewax keeps state in memory and
snapshots it to SQLite for recovery: a recovery directory is set up, epoch 10 s, the
default).  After the N-th record the process writes its stats; the benchmark then stops it
(SIGTERM)."""
import json
import os
import subprocess
import sys

from ..work import timed_result
from .peerlib import Progress, parse_args


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    import bytewax.operators as op
    from bytewax._bytewax import cli_main
    from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
    from bytewax.dataflow import Dataflow
    from bytewax.recovery import RecoveryConfig

    flow = Dataflow(f"{args.prefix}-bytewax")
    # consumer settings: no group is joined (KafkaSource assigns the partitions)
    source = KafkaSource([args.bootstrap], [f"{args.prefix}-in"], tail=True,
                         add_config={"group.id": f"{args.prefix}-bytewax"})
    messages = op.input("in", flow, source)
    progress = Progress(args.records, args.keys)
    loads = json.loads
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    recovery = None

    if args.workload == "stateless":
        def process(msg):  # noqa: ANN001
            out = KafkaSinkMessage(msg.key, dumps(timed_result(loads(msg.value))).encode())
            progress.record()
            return out

        op.output("out", op.map("work", messages, process),
                  KafkaSink([args.bootstrap], f"{args.prefix}-out"))
    else:
        def count(state, msg):  # noqa: ANN001
            record = loads(msg.value)
            if state is None:
                state = [0, 0]
            state[0] += 1
            state[1] += record["amount"]
            progress.record(record["n"], msg.key.decode(), state[0], state[1])
            return state, None

        keyed = op.key_on("key", messages, lambda msg: msg.key.decode())
        counted = op.stateful_map("count", keyed, count)
        op.output("none", op.filter("nothing", counted, lambda kv: False), _null_sink())
        db = os.path.join(args.workdir, "bytewax-recovery")
        os.makedirs(db, exist_ok=True)
        subprocess.run([sys.executable, "-m", "bytewax.recovery", db, "1"], check=True,
                       capture_output=True)
        recovery = RecoveryConfig(db)
    cli_main(flow, workers_per_process=1, recovery_config=recovery)


def _null_sink():  # noqa: ANN202
    from bytewax.outputs import DynamicSink, StatelessSinkPartition

    class Nothing(StatelessSinkPartition):
        def write_batch(self, items) -> None:  # noqa: ANN001
            pass

    class NullSink(DynamicSink):
        def build(self, step_id, worker_index, worker_count):  # noqa: ANN001
            return Nothing()

    return NullSink()


if __name__ == "__main__":
    main()
