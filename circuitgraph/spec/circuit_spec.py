"""Circuit specs: one pydantic model for JSON and Python, plus the EAP-IG / MIB circuit JSON.

A spec names groups of nodes, connections between groups (with q/k/v ports and positions),
explicit edges, and metadata.  With no connections or edges it is a *node circuit*: every edge
between its nodes (``input`` and ``logits`` always in) belongs to it.  Validation against a
model's :class:`~circuitgraph.graph.Graph` names the offending entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from circuitgraph.data.dataset import parse_json
from circuitgraph.graph import PORTS, Graph, GraphError, NodeRef

FORMAT = "circuitgraph/1"
Port = Literal["q", "k", "v"]
Fraction = Annotated[float, Field(ge=0, le=1)]


class SpecError(ValueError):
    """A circuit spec that is malformed or does not fit the model's graph."""


class Group(BaseModel):
    """A named set of nodes, e.g. the name-mover heads, with the positions where they act."""

    model_config = ConfigDict(extra="forbid")
    nodes: list[str]
    positions: list[str] | None = Field(None, description="token positions where this group's outputs count (default: all)")
    description: str | None = None
    color: str | None = None


class Connection(BaseModel):
    """Every edge from the nodes of ``src`` to the nodes of ``dst`` (groups or single nodes)."""

    model_config = ConfigDict(extra="forbid")
    src: str
    dst: str
    ports: list[Port] | None = Field(None, description="q/k/v ports when dst holds heads (default: all three)")
    positions: list[str] | None = Field(None, description="positions of the edges (default: the src group's positions)")


class Edge(BaseModel):
    """One explicit edge, ``SRC->DST`` with a port on head destinations."""

    model_config = ConfigDict(extra="forbid")
    edge: str
    score: float | None = None
    positions: list[str] | None = None


class CircuitSpec(BaseModel):
    """A circuit hypothesis.  Chainable builders: :meth:`group`, :meth:`connect`, :meth:`add_edge`."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["circuitgraph/1"] = FORMAT
    name: str | None = None
    model: str | None = None
    task: str | None = None
    source: str | None = Field(None, description="citation of where the circuit comes from")
    description: str | None = None
    groups: dict[str, Group] = Field(default_factory=dict)
    nodes: list[str] = Field(default_factory=list, description="nodes in the circuit besides group members")
    connections: list[Connection] = Field(default_factory=list)
    edges: list[Edge] = Field(default_factory=list)
    edge_scores: dict[str, float | None] = Field(default_factory=dict, description="scores of edges, in or out of the circuit")
    position_scores: dict[str, dict[str, float | None]] = Field(
        default_factory=dict, description="by-position scores: edge -> position span -> score ('rest': every position the "
                                          "dataset does not name); edge_scores holds their sums")
    edge_frequency: dict[str, Fraction] = Field(
        default_factory=dict, description="bootstrap inclusion frequencies: edge -> fraction of the resamples whose circuit "
                                          "held it (at any position); an edge not listed was in none (metadata.bootstrap says how)")
    position_frequency: dict[str, dict[str, Fraction]] = Field(
        default_factory=dict, description="by-position bootstrap inclusion frequencies: edge -> position span -> fraction")
    node_scores: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("groups", mode="before")
    @classmethod
    def _group_shorthand(cls, v):
        if isinstance(v, dict):
            return {k: ({"nodes": g} if isinstance(g, list) else g) for k, g in v.items()}
        return v

    @field_validator("edges", mode="before")
    @classmethod
    def _edge_shorthand(cls, v):
        if isinstance(v, list):
            return [{"edge": e} if isinstance(e, str) else e for e in v]
        return v

    @model_validator(mode="after")
    def _check_names(self):
        owner: dict[str, str] = {}
        for gname, g in self.groups.items():
            if not g.nodes:
                raise ValueError(f"group '{gname}' has no nodes")
            for n in g.nodes:
                if n in owner:
                    raise ValueError(f"node '{n}' is in both groups '{owner[n]}' and '{gname}'; a node belongs to one group")
                owner[n] = gname
        seen = set()
        for e in self.edges:
            if e.edge in seen:
                raise ValueError(f"duplicate edge '{e.edge}' in 'edges'")
            seen.add(e.edge)
        return self

    # ----- builders ----------------------------------------------------------------------
    def group(self, name: str, nodes: list[str], positions: list[str] | None = None, **kw) -> "CircuitSpec":
        """Add a named group; a name already used, or a node already in another group, is an error
        (replacing a group silently would change the circuit without a trace)."""
        if name in self.groups:
            raise SpecError(f"group '{name}' already exists (nodes {self.groups[name].nodes}); use another name or edit spec.groups['{name}']")
        if isinstance(nodes, str):
            nodes = [nodes]
        for n in nodes:
            if (other := self.group_of(n)) is not None:
                raise SpecError(f"group '{name}': node '{n}' is already in group '{other}'; a node belongs to one group")
        self.groups[name] = Group(nodes=list(nodes), positions=positions, **kw)
        return self

    def connect(self, src: str, dst: str, ports: str | list[str] | None = None, positions: list[str] | None = None) -> "CircuitSpec":
        """Add every edge from ``src`` to ``dst`` (optionally only
        some head ports, at some positions); returns the spec."""
        if isinstance(ports, str):
            ports = list(ports)
        self.connections.append(Connection(src=src, dst=dst, ports=ports, positions=positions))
        return self

    def add_edge(self, edge: str, score: float | None = None, positions: list[str] | None = None) -> "CircuitSpec":
        """Add one edge by name, with its score and positions; a duplicate is an error. Returns the spec."""
        if any(e.edge == edge for e in self.edges):
            raise SpecError(f"duplicate edge '{edge}'")
        self.edges.append(Edge(edge=edge, score=score, positions=positions))
        return self

    @property
    def is_node_circuit(self) -> bool:
        """No connections and no edges: the induced edges of the nodes.  A spec read from MIB JSON
        is always a set of edges (its in-graph nodes only annotate them)."""
        return not self.connections and not self.edges and "mib_cfg" not in self.metadata

    @property
    def is_empty(self) -> bool:
        """Selects nothing: no groups, nodes, connections or edges."""
        return not (self.groups or self.nodes or self.connections or self.edges)

    def contents(self) -> str:
        """What the spec holds, in words (for messages about specs that select little or nothing)."""
        parts = []
        if self.groups:
            parts.append(f"{len(self.groups)} group(s) ({', '.join(self.groups)})")
        for key in ("nodes", "connections", "edges"):
            if getattr(self, key):
                parts.append(f"{len(getattr(self, key))} {key}")
        if not parts:
            fields = sorted(self.model_fields_set - {"groups", "nodes", "connections", "edges"})
            return "only " + ", ".join(fields) if fields else "nothing at all"
        return ", ".join(parts)

    def require_selection(self, where: str = "the spec") -> "CircuitSpec":
        """Raise if the spec selects nothing (``{}``, or only metadata), naming what it does hold."""
        if self.is_empty:
            raise SpecError(f"{where} selects nothing: it has no groups, nodes, connections or edges (it holds {self.contents()})")
        return self

    def all_nodes(self) -> list[str]:
        """The spec's nodes and every group member, each once."""
        out = list(self.nodes)
        for g in self.groups.values():
            out += [n for n in g.nodes if n not in out]
        return out

    def group_of(self, node: str) -> str | None:
        """The name of the group holding ``node``, or ``None``."""
        return next((name for name, g in self.groups.items() if node in g.nodes), None)

    # ----- resolution against a graph ----------------------------------------------------
    def resolve(self, graph: Graph) -> "ResolvedCircuit":
        """The circuit's edges in ``graph``, each with its positions (``None`` = all)."""
        try:
            return self._resolve(graph)
        except GraphError as e:
            raise SpecError(str(e)) from None

    def _members(self, name: str, graph: Graph, where: str) -> tuple[list[str], list[str] | None]:
        if name in self.groups:
            g = self.groups[name]
            return g.nodes, g.positions
        try:
            graph.check_node(name)
        except GraphError:
            raise SpecError(f"{where}: '{name}' is neither a group ({', '.join(self.groups) or 'none defined'}) nor a node of the model") from None
        return [name], None

    def _resolve(self, graph: Graph) -> "ResolvedCircuit":
        for gname, g in self.groups.items():
            for n in g.nodes:
                graph.check_node(n, where=f"group '{gname}': node")
        for n in self.nodes:
            graph.check_node(n, where="nodes: node")
        edges: dict[tuple[int, int], set[str] | None] = {}

        def add(s: int, d: int, positions):
            if (s, d) in edges and (edges[(s, d)] is None or positions is None):
                edges[(s, d)] = None
            elif (s, d) in edges:
                edges[(s, d)] = edges[(s, d)] | set(positions)
            else:
                edges[(s, d)] = None if positions is None else set(positions)

        if self.is_node_circuit:
            members = set(self.all_nodes()) | {"input", "logits"}
            for name, (s, d) in graph.edge_index.items():
                src = graph.sources[s]
                if src in members and graph.node_of(graph.destinations[d]) in members:
                    group = self.group_of(src)
                    add(s, d, self.groups[group].positions if group else None)
        for i, c in enumerate(self.connections):
            where = f"connections[{i}] ({c.src} -> {c.dst})"
            srcs, src_pos = self._members(c.src, graph, where)
            dsts, _ = self._members(c.dst, graph, where)
            positions = c.positions if c.positions is not None else src_pos
            n_added = 0
            for dst in dsts:
                if dst == "input":
                    raise SpecError(f"{where}: 'input' cannot be a destination")
                is_head = NodeRef.parse(dst).is_head
                if c.ports and not is_head:
                    raise SpecError(f"{where}: ports {c.ports} given, but destination '{dst}' is not an attention head")
                for src in srcs:
                    if src == "logits":
                        raise SpecError(f"{where}: 'logits' cannot be a source")
                    for port in (c.ports or PORTS) if is_head else [None]:
                        name = f"{src}->{dst}<{port}>" if port else f"{src}->{dst}"
                        if name in graph.edge_index:
                            add(*graph.edge_index[name], positions)
                            n_added += 1
            if n_added == 0:
                raise SpecError(f"{where}: no edge of the model goes from '{c.src}' to '{c.dst}' (edges only go to later layers)")
        for e in self.edges:
            add(*graph.check_edge(e.edge), e.positions)
        for name in (*self.edge_scores, *self.position_scores, *self.edge_frequency, *self.position_frequency):
            graph.check_edge(name)
        return ResolvedCircuit(graph, {k: (None if v is None else sorted(v)) for k, v in edges.items()})

    # ----- files -------------------------------------------------------------------------
    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """The spec as JSON text with its format version first, also written to ``path`` when given."""
        text = self.model_dump_json(indent=indent, exclude_defaults=True)
        text = json.dumps({"format": FORMAT, **json.loads(text)}, indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "CircuitSpec":
        """Our spec or an EAP-IG/MIB circuit, told apart by their fields."""
        if not isinstance(data, dict):
            raise SpecError(f"a circuit spec must be a JSON object, got {type(data).__name__}")
        if is_mib(data):
            return from_mib(data)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise SpecError(_pretty(e)) from None

    @classmethod
    def load(cls, path: str | Path) -> "CircuitSpec":
        """A spec file (ours or EAP-IG/MIB JSON), or a shipped spec by name (``"induction_toy"``)."""
        from circuitgraph.spec.shipped import missing_spec_hint, resolve_spec

        given, path = path, resolve_spec(path)
        if path.is_dir():
            raise SpecError(f"spec '{given}' is a directory; expected a circuit spec JSON file")
        if not path.is_file():
            raise SpecError(f"spec file '{given}' does not exist{missing_spec_hint(given)}")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise SpecError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
        try:
            data = parse_json(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"spec file '{path}' is not valid JSON: {e}") from None
        except ValueError as e:
            raise SpecError(f"spec file '{path}': {e}") from None
        try:
            return cls.from_dict(data)
        except SpecError as e:
            raise SpecError(f"spec file '{path}': {e}") from None

    def to_mib(self, graph: Graph) -> dict:
        """The spec as an EAP-IG/MIB circuit JSON object for ``graph``."""
        return to_mib(self, graph)


class ResolvedCircuit:
    """A spec's edges as (source, destination) indices of one graph, ready for the engine."""

    def __init__(self, graph: Graph, edges: dict[tuple[int, int], list[str] | None]):
        self.graph = graph
        self.edges = edges

    def __len__(self) -> int:
        return len(self.edges)

    @property
    def edge_names(self) -> list[str]:
        """The circuit's edges by name, in (source, destination) order."""
        g = self.graph
        return [f"{g.sources[s]}->{g.destinations[d]}" for s, d in self.edges]

    @property
    def position_names(self) -> set[str]:
        """Every position name the circuit's edges are restricted to."""
        return {p for v in self.edges.values() if v for p in v}

    def mask(self) -> torch.Tensor:
        """Bool ``[n_sources, n_destinations]`` of the edges that are in at every position."""
        m = torch.zeros(len(self.graph.sources), len(self.graph.destinations), dtype=torch.bool)
        for (s, d), pos in self.edges.items():
            if pos is None:
                m[s, d] = True
        return m

    def edge_mask(self) -> torch.Tensor:
        """Bool ``[n_sources, n_destinations]`` of every edge in the circuit, at any position."""
        m = torch.zeros(len(self.graph.sources), len(self.graph.destinations), dtype=torch.bool)
        for s, d in self.edges:
            m[s, d] = True
        return m

    def without(self, edges: list[tuple[int, int]]) -> "ResolvedCircuit":
        """The same circuit without the given ``(source, destination)`` edges."""
        drop = set(edges)
        return ResolvedCircuit(self.graph, {k: v for k, v in self.edges.items() if k not in drop})


def _pretty(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" + (f" (got {err['input']!r})" if err["type"] in ("literal_error", "string_type", "list_type") else ""))
    return "invalid circuit spec: " + "; ".join(parts)


# ----- EAP-IG / MIB circuit JSON --------------------------------------------------------
def is_mib(data: dict) -> bool:
    """Whether parsed JSON is an EAP-IG/MIB circuit rather than our format."""
    return "edges" in data and isinstance(data.get("edges"), dict) and "format" not in data


def from_mib(data: dict) -> CircuitSpec:
    """Read an EAP-IG/MIB circuit: in-graph edges become the circuit, every score is kept."""
    for key in ("cfg", "nodes", "edges"):
        if key not in data:
            raise SpecError(f"MIB circuit JSON is missing '{key}' (expected cfg, nodes and edges)")
    edges, scores = [], {}
    for name, v in data["edges"].items():
        if not isinstance(v, dict) or "in_graph" not in v:
            raise SpecError(f"MIB circuit JSON: edge '{name}' needs an object with 'in_graph' (and 'score')")
        if "score" in v:
            scores[name] = v["score"]
        if v["in_graph"]:
            edges.append(Edge(edge=name))
    nodes = [n for n, v in data["nodes"].items() if v.get("in_graph")]
    node_scores = {n: v["score"] for n, v in data["nodes"].items() if "score" in v and v["score"] is not None}
    meta = {"mib_cfg": data["cfg"], "mib_node_order": list(data["nodes"])}
    extra = {k: v for k, v in data.items() if k not in ("cfg", "nodes", "edges")}
    if extra:
        meta["mib_extra"] = extra
    return CircuitSpec(nodes=nodes, edges=edges, edge_scores=scores, node_scores=node_scores, metadata=meta)


def to_mib(spec: CircuitSpec, graph: Graph) -> dict:
    """Write the EAP-IG/MIB circuit JSON: every edge of the graph with its score and ``in_graph``."""
    resolved = spec.resolve(graph)
    if resolved.position_names:
        raise SpecError("the MIB circuit format has no positions; drop the position restrictions before exporting")
    in_graph = set(resolved.edge_names)
    scores = dict(spec.edge_scores)
    for e in spec.edges:
        if e.score is not None:
            scores.setdefault(e.edge, e.score)
    cfg = spec.metadata.get("mib_cfg") or {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
                                           "parallel_attn_mlp": graph.parallel_attn_mlp, "d_model": graph.d_model}
    order = list(spec.edge_scores) + [e for e in graph.edges if e not in spec.edge_scores]
    edges = {}
    for name in order:
        entry = {"score": scores.get(name, 0.0), "in_graph": name in in_graph}
        edges[name] = entry
    node_set = set(spec.all_nodes())
    if not node_set:  # no nodes named: the nodes the edges touch
        node_set = {graph.sources[s] for s, _ in resolved.edges} | {graph.node_of(graph.destinations[d]) for _, d in resolved.edges}
    node_order = spec.metadata.get("mib_node_order") or graph.nodes
    nodes = {}
    for n in node_order:
        nodes[n] = {"in_graph": n in node_set}
        if n in spec.node_scores:
            nodes[n]["score"] = spec.node_scores[n]
    return {"cfg": cfg, "nodes": nodes, "edges": edges, **spec.metadata.get("mib_extra", {})}


def json_schema() -> dict:
    """The published JSON schema of circuit specs."""
    return CircuitSpec.model_json_schema()
