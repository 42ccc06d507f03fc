"""``python scripts/bench ...`` or ``python -m scripts.bench ...`` (from the repository root),
or ``python -m bench ...`` with ``scripts/`` as the current directory."""
import os
import sys

if not __package__:  # run as a directory: import the package as ``bench`` from scripts/
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))
    from bench.runner import main
else:
    from .runner import main

sys.exit(main())
