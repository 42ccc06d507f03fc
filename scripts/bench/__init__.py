"""shardsup's benchmark: end-to-end throughput of shardsup against a raw confluent-kafka loop
doing the same work, and against other stream processors (``--peers``), in one run.

Run it from the repository root::

    .venv/bin/python scripts/bench --workload stateless            # or: -m scripts.bench
    .venv/bin/python scripts/bench.py --runs state-kill             # the old entry point
    .venv/bin/python scripts/bench --records 300000 --peers         # with Quix, Faust, ...

docs/benchmark.md describes the workloads, the systems, the columns and a measured run.
Modules: runner (command line, the run loop), workloads/ (stateless, stateful, restore,
kill), systems/ (raw loops, shardsup, the peers and their virtualenv), results (tables,
JSON), plot (PNG), kafkaio and measure (shared helpers), work (the per-record work).

This package is imported by the peers' processes too (another virtualenv, without
confluent-kafka or shardsup): ``__init__`` modules and ``work`` import the standard library
only.
"""
