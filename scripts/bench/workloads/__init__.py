"""One module per workload: ``stateless`` (json.loads → work → produce a result),
``stateful`` (count and sum per key), ``restore`` (a task restores a large changelog) and
``kill`` (kill -9 of a busy child → its next processed record)."""
