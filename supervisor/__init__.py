"""shardsup's supervisor process: CLI, group membership, children, signals.

PyPI's ``supervisor`` distribution (supervisord) installs a top-level package of this
same name; :data:`SHARDSUP_SUPERVISOR` lets ``shardsup`` tell the two apart and say so.
"""

SHARDSUP_SUPERVISOR = True
