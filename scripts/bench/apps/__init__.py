"""Apps the benchmark starts with ``shardsup start -A bench.apps.<name>`` (``scripts/`` as
the current directory): ``twostage`` (re-key with ``group_by``, then count and sum).  The
older apps live beside the package (``scripts/bench_app.py``, ``scripts/bench_state_app.py``).

Imports the standard library only (this package is imported by the peers' processes too)."""
