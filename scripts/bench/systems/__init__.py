"""The systems measured: ``raw`` (plain confluent-kafka loops), ``shardsup`` and the peers
(``quix``, ``faust``, ``bytewax``, ``pathway``; ``peers`` runs them from their own
virtualenv).  The peer modules are run in that virtualenv and import only the standard
library, ``bench.work`` and their framework."""
