"""End-to-end throughput of shardsup against a raw confluent-kafka loop and other stream
processors: the old entry point of the benchmark, now the package ``scripts/bench/``.

    .venv/bin/python scripts/bench.py [flags]   ==   .venv/bin/python scripts/bench [flags]

Same flags (``--workload stateless|stateful|all``, ``--runs``, ``--records``, ``--peers``,
...); docs/benchmark.md describes the workloads, the systems and the columns.
"""
import os
import sys

if __name__ == "__main__":
    # scripts/ is sys.path[0]: ``bench`` is the package (a package wins over bench.py)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench.runner import main

    sys.exit(main())
