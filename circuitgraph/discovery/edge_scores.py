"""Per-edge scores from any discovery method, in one structure, and their selection into circuits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuitgraph.data.dataset import REST, DataError, TaskData
from circuitgraph.graph.computational_graph import Graph
from circuitgraph.graph.prune import mib_prune
from circuitgraph.spec.circuit_spec import CircuitSpec, Edge, ResolvedCircuit

# "metric": a score is the change of the metric when the edge is ablated (ours); "loss": minus that (MIB's
# run_attribution.py attributes the loss)
SCORE_SIGNS = ("metric", "loss")


@dataclass
class EdgeScores:
    """``scores[s, d]`` for every edge (NaN where no edge exists), plus what produced them.

    Sign convention (MIB / Hanna et al.): a score estimates M(edge ablated) - M(clean), so an edge
    the task needs usually has a negative score under logit difference; selection uses |score|.

    By position (``spans`` given) the units are edge x span: ``scores[s, d, j]`` estimates the change
    when the edge is ablated at the tokens of span ``spans[j]`` only (a position the dataset names, or
    ``rest``: every other token); selection, masks and curves then count units.
    """

    graph: Graph
    scores: torch.Tensor  # [n_sources, n_destinations] (by position: [..., n_spans])
    method: str
    meta: dict = field(default_factory=dict)
    in_circuit: torch.Tensor | None = None  # methods that decide membership themselves (ACDC)
    spans: list[str] | None = None

    def __post_init__(self):
        legal = self.graph.legal if self.spans is None else self.graph.legal[..., None]
        if self.spans is not None and (self.scores.dim() != 3 or self.scores.shape[2] != len(self.spans)):
            raise ValueError(f"by-position scores need shape [sources, destinations, {len(self.spans)}], got {list(self.scores.shape)}")
        self.scores = self.scores.detach().double().cpu().masked_fill(~legal, float("nan"))

    @property
    def n_units(self) -> int:
        """What selection counts: edges, or edge x span units."""
        return self.graph.n_edges * (len(self.spans) if self.spans else 1)

    def summed(self) -> "EdgeScores":
        """The per-edge scores: by-position scores summed over the spans (for a linear attribution, the
        scores of the same method without positions); itself without spans."""
        if self.spans is None:
            return self
        return EdgeScores(self.graph, self.scores.sum(-1), self.method, self.meta, self.in_circuit)

    def edge_values(self) -> torch.Tensor:
        """Scores in ``graph.edges`` order (``[n_edges, n_spans]`` by position)."""
        idx = torch.tensor([self.graph.edge_index[e] for e in self.graph.edges])
        return self.scores[idx[:, 0], idx[:, 1]]

    def as_dict(self) -> dict[str, float]:
        """``{edge name: score}`` in ``graph.edges`` order (by position: ``{edge: {span: score}}``)."""
        values = self.edge_values().tolist()
        if self.spans is not None:
            values = [dict(zip(self.spans, v)) for v in values]
        return dict(zip(self.graph.edges, values))

    def to_dict(self) -> dict[str, list]:
        """Columns ``edge, source, destination, port, score, abs_score`` (and ``span`` by position), a plain
        dict of lists: ``pandas.DataFrame(scores.to_dict())`` is the table, one row per edge (or unit) in
        ``graph.edges`` order."""
        g = self.graph
        cols: dict[str, list] = {"edge": [], "source": [], "destination": [], "port": [], "score": [], "abs_score": []}
        if self.spans is not None:
            cols["span"] = []
        for name, v in self.as_dict().items():
            src, dst = name.split("->")
            for span, x in (v.items() if self.spans is not None else [(None, v)]):
                cols["edge"].append(name)
                cols["source"].append(src)
                cols["destination"].append(g.node_of(dst))
                cols["port"].append(dst[dst.index("<") + 1:-1] if "<" in dst else None)
                cols["score"].append(x)
                cols["abs_score"].append(abs(x))
                if span is not None:
                    cols["span"].append(span)
        return cols

    def units(self, mask: torch.Tensor) -> list[tuple[str, str | None, float]]:
        """``(edge, span, score)`` of each selected unit (span None without positions), in ``graph.edges`` order."""
        out = []
        for name, v in self.as_dict().items():
            s, d = self.graph.edge_index[name]
            if self.spans is None:
                if mask[s, d]:
                    out.append((name, None, v))
            else:
                out += [(name, span, v[span]) for j, span in enumerate(self.spans) if mask[s, d, j]]
        return out

    def circuit(self, mask: torch.Tensor) -> ResolvedCircuit:
        """The circuit of a selection, ready to evaluate: each edge at its selected spans (at every position
        when every span is selected, which is the same thing)."""
        if self.spans is None:
            return ResolvedCircuit(self.graph, {tuple(sd): None for sd in torch.nonzero(mask).tolist()})
        edges: dict = {}
        for s, d, j in torch.nonzero(mask).tolist():
            edges.setdefault((s, d), []).append(self.spans[j])
        full = len(self.spans)
        return ResolvedCircuit(self.graph, {k: (None if len(v) == full else sorted(v)) for k, v in edges.items()})

    # ----- selection ---------------------------------------------------------------------
    def top_n(self, n: int, absolute: bool = True) -> torch.Tensor:
        """Bool mask of the ``n`` highest-scoring edges."""
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"top_n needs a positive integer, got {n!r}")
        vals = self.scores.abs() if absolute else self.scores
        flat = torch.nan_to_num(vals, nan=-float("inf")).flatten()
        n = min(int(n), self.n_units)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.topk(n).indices] = True
        return mask.view_as(self.scores)

    def threshold(self, t: float, absolute: bool = True) -> torch.Tensor:
        """Bool mask of the edges scoring ``>= t`` (``|score| >= t`` when ``absolute``)."""
        if t != t:
            raise ValueError("threshold is NaN; expected a number")
        vals = self.scores.abs() if absolute else self.scores
        return torch.nan_to_num(vals, nan=-float("inf")) >= t

    def greedy(self, n: int, absolute: bool = True) -> torch.Tensor:
        """EAP-IG's greedy selection: grow from the logits, always adding the best edge into a node
        already in the circuit, so every chosen edge connects to the output."""
        if self.spans is not None:
            raise ValueError("greedy selection grows whole edges from the logits and has no by-position form; "
                             "select by-position scores by top-n or a threshold")
        g = self.graph
        vals = torch.nan_to_num(self.scores.abs() if absolute else self.scores, nan=-float("inf"))
        mask = torch.zeros_like(vals, dtype=torch.bool)
        dst_of_node: dict[str, list[int]] = {}
        for d, name in enumerate(g.destinations):
            dst_of_node.setdefault(g.node_of(name), []).append(d)
        open_dsts = set(dst_of_node["logits"])
        in_nodes = {"logits"}
        for _ in range(min(n, g.n_edges)):
            cols = sorted(open_dsts)
            sub = vals[:, cols].masked_fill(mask[:, cols], -float("inf"))
            best = int(sub.argmax())
            s, c = divmod(best, len(cols))
            if sub[s, c] == -float("inf"):
                break
            mask[s, cols[c]] = True
            src = g.sources[s]
            if src not in in_nodes and src != "input":
                in_nodes.add(src)
                open_dsts |= set(dst_of_node[src])
        return mask

    @classmethod
    def from_spec(cls, spec: CircuitSpec, graph: Graph, sign: str = "metric", where: str = "the spec") -> "EdgeScores":
        """The scores a spec (ours or MIB JSON) carries for every edge of ``graph``.

        ``sign="metric"``: the file holds changes of the metric (ours, and MIB's published circuit files);
        ``"loss"``: attributions of the loss (minus the metric), as MIB's ``run_attribution.py`` writes; they
        are negated so that every score here is a change of the metric.  A spec written by by-position
        discovery gives its edge x span scores."""
        if sign not in SCORE_SIGNS:
            raise ValueError(f"score sign must be one of {', '.join(SCORE_SIGNS)}, got {sign!r}")
        if spec.position_scores:
            spans = list(spec.metadata.get("spans") or next(iter(spec.position_scores.values())))
            per_span = [CircuitSpec(edge_scores={e: v.get(span) for e, v in spec.position_scores.items()}, metadata=spec.metadata)
                        for span in spans]
            parts = [cls.from_spec(p, graph, sign, f"{where} (position '{span}')") for p, span in zip(per_span, spans)]
            return cls(graph, torch.stack([p.scores for p in parts], -1), parts[0].method, spans=spans)
        values = torch.full(graph.legal.shape, float("nan"), dtype=torch.float64)
        known = {k: v for k, v in spec.edge_scores.items() if v is not None}
        if unknown := [e for e in known if e not in graph.edge_index]:
            raise ValueError(f"{where} scores edge '{unknown[0]}' (and {len(unknown) - 1} more) that this model does not have; "
                             f"is it for another model?")
        missing = [e for e in graph.edges if e not in known]
        if missing:
            raise ValueError(f"{where} has scores for {len(graph.edges) - len(missing)} of the model's {len(graph.edges)} edges "
                             f"(none for '{missing[0]}'); a ranking needs every edge's score (write it with discover)")
        for name, v in known.items():
            if not isinstance(v, (int, float)) or v != v:
                raise ValueError(f"{where}: the score of edge '{name}' is {v!r}; expected a number")
            values[graph.edge_index[name]] = float(v)
        if sign == "loss":
            values = -values
        return cls(graph, values, str(spec.metadata.get("method", "scores")))

    def to_spec(self, mask: torch.Tensor, prune: bool = False, **meta) -> CircuitSpec:
        """A circuit spec of the selected edges; every edge's score is kept in ``edge_scores``.  By position
        each edge lists the spans it was selected at in ``positions`` (``rest``: every position the dataset
        does not name) with the sum of their scores, and every unit's score is kept in ``position_scores``."""
        if prune:
            mask = prune_dangling(self.graph, mask)
        values = self.summed().as_dict()
        chosen: dict[str, list] = {}
        for name, span, v in self.units(mask):
            chosen.setdefault(name, []).append((span, v))
        edges = [Edge(edge=name, score=_finite(sum(v for _, v in u)), positions=None if self.spans is None else [s for s, _ in u])
                 for name, u in chosen.items()]
        spec = CircuitSpec(edges=edges, edge_scores={e: _finite(v) for e, v in values.items()},
                           metadata={"method": self.method, "score_sign": "metric", **self.meta, **meta})
        if self.spans is not None:
            spec.position_scores = {e: {span: _finite(x) for span, x in v.items()} for e, v in self.as_dict().items()}
            spec.metadata["spans"] = list(self.spans)
        return spec


def spans_of(data: TaskData) -> list[str]:
    """The spans of by-position scores: the dataset's named positions, then ``rest``; refused (naming the
    row) unless every row names every position, each at its own token."""
    if not data.positions:
        raise DataError("by-position scores need named positions, and the dataset names none "
                        "(give each row \"positions\": {\"NAME\": token index, ...})")
    names = sorted(data.positions, key=lambda n: (float(data.positions[n].float().mean()), n))  # in prompt order
    data.span_index(names)
    return names + [REST]


def _finite(v: float) -> float | None:
    return None if v != v else float(v)


def prune_dangling(graph: Graph, mask: torch.Tensor) -> torch.Tensor:
    """Drop edges that are not on any input -> logits path of the selected edges.  That is what
    :func:`mib_prune` leaves when it runs to the end: a node kept there has an incoming edge from a
    kept node (so a chain back to ``input``) and an outgoing one (so a chain on to ``logits``)."""
    return mib_prune(graph, mask)
