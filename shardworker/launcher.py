"""The ``shardsup`` console script: checks that ``supervisor`` is shardsup's, then runs it.

PyPI's supervisord also installs a top-level package named ``supervisor``.  If that one
shadows ours, an ImportError deep in the CLI would say nothing useful; this says what
happened and what to do, in one line.
"""
from __future__ import annotations

import sys


def main() -> None:
    try:
        import supervisor

        if not getattr(supervisor, "SHARDSUP_SUPERVISOR", False):
            raise ImportError(getattr(supervisor, "__file__", "?"))
        from supervisor.cli import main as cli_main
    except ImportError as exc:
        where = getattr(sys.modules.get("supervisor"), "__file__", None) or str(exc)
        sys.stderr.write(
            f"shardsup: error: the 'supervisor' package imported from {where} is not "
            "shardsup's (supervisord also installs one); install shardsup in its own "
            "virtualenv, without supervisord\n")
        sys.exit(2)
    cli_main()
