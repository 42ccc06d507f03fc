"""Finds an app's stream graph before anything runs: which tables each agent uses, where
an agent re-keys (``stream.group_by(..., name=...)`` or ``stream.through(topic)``), and
from that the sub-topologies (:mod:`shardworker.topology`).

The supervisor must know every source and repartition topic before it joins the group,
and must not run user code to learn them (an agent's body may have side effects), so the
agents' source is read, not run: names in an agent's body (and in the module-level
functions it calls, a few levels deep) that refer to a table link the agent to it, and a
``group_by``/``through`` call must name its topic with literals.  A table used in a way
the reading cannot see (through an attribute of another module, say) can be named with
``app.agent(..., tables=[...])``.  DESIGN.md, "Sub-topologies".
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

from .topology import SubTopology, Topology

if TYPE_CHECKING:  # pragma: no cover
    from .app import Agent, App

#: how deep calls from an agent into module-level functions are followed for table names
FOLLOW_CALLS = 3


class TopologyError(ValueError):
    """The app's graph cannot be built or run; the message is one line."""


@dataclass(frozen=True)
class Regroup:
    """Where an agent's stream is re-keyed: records of its source topics are forwarded to
    ``topic`` (keyed by ``key`` for ``group_by``; as they are for ``through``) and the rest
    of the agent runs on the tasks of ``topic``."""

    kind: str                       # "group_by" or "through"
    topic: str
    name: str = ""                  # group_by's name=
    partitions: Optional[int] = None
    key_serializer: Optional[str] = None


@dataclass
class AgentScan:
    """What reading an agent's source found."""

    tables: List[Any]
    regroup: Optional[Regroup]


def repartition_topic(app_id: str, name: str) -> str:
    """The internal topic of ``group_by(..., name=name)``."""
    return f"{app_id}-{name}-repartition"


# -- reading an agent ---------------------------------------------------------------------
def scan_agent(app: "App", agent: "Agent") -> AgentScan:
    """The tables ``agent`` uses and its re-keying, read from its source."""
    from .tables import Table
    from .windows import WindowView

    tables: List[Any] = []
    regroups: List[Regroup] = []
    seen: Set[int] = set()

    def visit(fn: Any, depth: int) -> None:
        code = getattr(fn, "__code__", None)
        if code is None or id(code) in seen:
            return
        seen.add(id(code))
        tree = _parse(fn)
        if tree is None:
            if depth == 0:
                raise TopologyError(f"agent {agent.name}: its source cannot be read, so its "
                                    "tables and re-keying are unknown (define it in a module file)")
            return
        scope = _scope(fn)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in scope:
                value = scope[node.id]
                if isinstance(value, WindowView):
                    value = value.table
                if isinstance(value, Table):
                    if value not in tables:
                        tables.append(value)
                elif (inspect.isfunction(value) and depth < FOLLOW_CALLS
                      and getattr(value, "__module__", "") not in _LIBRARY_MODULES):
                    visit(value, depth + 1)
            elif depth == 0 and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("group_by", "through"):
                regroups.append(_regroup(app, agent, node, scope))

    visit(agent.fn, 0)
    for table in agent.tables:
        if table not in tables:
            tables.append(table)
    if len(regroups) > 1:
        raise TopologyError(f"agent {agent.name} re-keys {len(regroups)} times; one group_by or "
                            "through per agent (chain agents through topics for more)")
    return AgentScan(tables, regroups[0] if regroups else None)


_LIBRARY_MODULES = {"shardworker", "shardworker.app", "shardworker.stream"}


def _parse(fn: Any) -> Optional[ast.AST]:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def _scope(fn: Any) -> Dict[str, Any]:
    scope = dict(getattr(fn, "__globals__", {}))
    closure = getattr(fn, "__closure__", None) or ()
    for name, cell in zip(fn.__code__.co_freevars, closure):
        try:
            scope[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    return scope


def _literal(node: Optional[ast.AST]) -> Any:
    return node.value if isinstance(node, ast.Constant) else _NOT_LITERAL


_NOT_LITERAL = object()


def _regroup(app: "App", agent: "Agent", call: ast.Call, scope: Dict[str, Any]) -> Regroup:
    from .app import Topic

    keywords = {k.arg: k.value for k in call.keywords if k.arg}
    if call.func.attr == "group_by":  # type: ignore[attr-defined]
        name = _literal(keywords.get("name"))
        if not isinstance(name, str) or not name:
            raise TopologyError(f"agent {agent.name}: group_by needs name='...' as a string "
                                "literal (it names the repartition topic, known before start)")
        partitions = _literal(keywords.get("partitions")) if "partitions" in keywords else None
        if partitions is not None and not isinstance(partitions, int):
            raise TopologyError(f"agent {agent.name}: group_by's partitions= must be an int literal")
        serializer = _literal(keywords.get("key_serializer")) if "key_serializer" in keywords else None
        if serializer is not None and not isinstance(serializer, str):
            raise TopologyError(f"agent {agent.name}: group_by's key_serializer= must be a "
                                "string literal")
        return Regroup("group_by", repartition_topic(app.id, name), name, partitions, serializer)
    target = call.args[0] if call.args else keywords.get("topic")
    value = _literal(target)
    if isinstance(target, ast.Name):
        value = scope.get(target.id, _NOT_LITERAL)
    if isinstance(value, Topic):
        value = value.name
    if not isinstance(value, str) or value not in app.topics:
        raise TopologyError(f"agent {agent.name}: through() needs a topic declared with "
                            "app.topic(...), named by a module-level variable or a string")
    return Regroup("through", value)


# -- the graph ----------------------------------------------------------------------------
def build_topology(app: "App") -> Topology:
    """The app's sub-topologies: topics linked by the tables their agents use, numbered by
    the order in which agents (in declaration order) first read them.  Declares the
    repartition topics of ``group_by`` on the app.  Tables no agent uses are held by
    sub-topology 0."""
    order: List[str] = []
    parent: Dict[str, str] = {}

    def add(topic: str) -> None:
        if topic not in parent:
            parent[topic] = topic
            order.append(topic)

    def find(topic: str) -> str:
        while parent[topic] != topic:
            parent[topic] = parent[parent[topic]]
            topic = parent[topic]
        return topic

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            # the earlier topic names the part (keeps numbering in declaration order)
            if order.index(ra) < order.index(rb):
                parent[rb] = ra
            else:
                parent[ra] = rb

    table_topic: Dict[str, str] = {}
    for agent in app.agents:
        scan = scan_agent(app, agent)
        agent.regroup = scan.regroup
        for topic in agent.topics:
            add(topic.name)
        stateful = [t.name for t in agent.topics]
        if scan.regroup is not None:
            _declare_regroup_topic(app, agent, scan.regroup)
            add(scan.regroup.topic)
            stateful = [scan.regroup.topic]
        if not scan.tables:
            continue
        for topic in stateful[1:]:
            union(stateful[0], topic)
        for table in scan.tables:
            if table.name in table_topic:
                union(table_topic[table.name], stateful[0])
            else:
                table_topic[table.name] = stateful[0]
    if not order:
        return Topology([])
    for table in app.tables:
        table_topic.setdefault(table.name, order[0])
    roots: List[str] = []
    for topic in order:
        root = find(topic)
        if root not in roots:
            roots.append(root)
    subs = []
    for index, root in enumerate(roots):
        sources = tuple(t for t in order if find(t) == root)
        tables = tuple(t.name for t in app.tables if find(table_topic[t.name]) == root)
        subs.append(SubTopology(index, sources, tables))
    return Topology(subs)


def _declare_regroup_topic(app: "App", agent: "Agent", regroup: Regroup) -> None:
    """A ``group_by``'s repartition topic, declared like its stream's first topic.  Its
    keys use the stream's key serializer, except that ``raw`` (bytes only) becomes
    ``str``: the same bytes for a ``str`` key, and an int key works too.  So a table fed
    by a ``str``-keyed topic and one fed through a repartition topic see the same key
    bytes, and (with Java's partitioner upstream) the same partition: a join works."""
    if regroup.kind != "group_by":
        return
    source = agent.topics[0]
    key_serializer = regroup.key_serializer or (
        "str" if source.key_serializer == "raw" else source.key_serializer)
    app.topic(regroup.topic, partitions=regroup.partitions, key_serializer=key_serializer,
              value_serializer=source.value_serializer, internal_like=source.name,
              value_type=source.value_type)


def check_copartitioned(topology: Topology, partitions: Dict[str, int]) -> Optional[str]:
    """One line naming the first sub-topology whose topics have different partition
    counts (``partitions``: per topic), or None when every one is co-partitioned."""
    for sub in topology.subtopologies:
        counts: List[Tuple[str, int]] = [(t, partitions[t]) for t in sub.sources if t in partitions]
        if len({n for _t, n in counts}) > 1:
            listed = ", ".join(f"{t}[{n}]" for t, n in counts)
            return (f"topics of sub-topology {sub.index} are not co-partitioned: {listed} "
                    f"(they share table(s) {', '.join(sub.tables) or 'none'}); give them the "
                    "same number of partitions")
    return None
