"""Scoring circuits: patched runs of whole circuits, and a circuit's faithfulness and necessity."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from circuitgraph.data.dataset import REST, TaskData
from circuitgraph.engine import Ablation
from circuitgraph.engine.node_runs import NodeRuns
from circuitgraph.errors import CircuitWarning
from circuitgraph.evaluate.baselines import bootstrap_se, normalised
from circuitgraph.spec.circuit_spec import CircuitSpec, ResolvedCircuit, SpecError

# circuits larger than this share of the edges always take a patched run: in-edges mixed one by one cost
# more than a patched run's mix of the fewer of a destination's in-circuit and out-of-circuit sources
NODE_RUNS_AT_MOST = 0.1
MEMO_CIRCUITS = 8  # circuits whose per-example values an Evaluator keeps (circuit_values)


@dataclass
class CircuitScore:
    """Faithfulness and necessity of one circuit.  A ratio whose denominator is zero or within noise
    is ``None`` with the reason in ``undefined_reason``; a standard error from one example is ``None``
    with ``se_reason``.  :meth:`to_dict` and :meth:`to_json` never hold NaN or Infinity."""

    metric: str
    ablation: str
    n_examples: int
    n_edges: int
    n_edges_total: int
    clean_metric: float
    corrupted_metric: float
    circuit_metric: float
    complement_metric: float
    faithfulness: float | None
    faithfulness_se: float | None
    necessity: float | None
    necessity_se: float | None
    clean_metric_se: float | None = None
    corrupted_metric_se: float | None = None
    circuit_metric_se: float | None = None
    prepend_bos: bool = False
    warnings: list[str] = field(default_factory=list)
    undefined_reason: str | None = None
    se_reason: str | None = None
    model: str | None = None
    quantization: str | None = None  # e.g. "Q4_1 (GGUF, dequantized to float32)"; None: weights as stored

    def to_dict(self) -> dict:
        """JSON-ready: every non-finite number becomes ``None`` (strict JSON has no NaN)."""
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}

    def to_json(self, **kw) -> str:
        """The score as one JSON object; undefined numbers are ``null`` (never NaN)."""
        return json.dumps(self.to_dict(), allow_nan=False, **kw)


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


class Scoring:
    """Patched runs of whole circuits (memoised per circuit) and the scores made of them."""

    @torch.no_grad()
    def metric_values(self, circuits: list[ResolvedCircuit], complement: bool = False, chunk: int | None = None,
                      desc: str | None = None) -> np.ndarray:
        """Per-example metric ``[C, N]`` with each circuit (or its complement) patched in.

        Circuits without positions go through :meth:`mask_values` together; position-restricted
        ones need per-example position masks and run one at a time."""
        out = np.zeros((len(circuits), len(self.data)), dtype=np.float64)
        plain = [i for i, c in enumerate(circuits) if not c.position_names]
        if plain:
            masks = torch.stack([circuits[i].mask() for i in plain])
            out[plain] = self.mask_values(self.graph.legal[None] & ~masks if complement else masks, chunk, desc)
        positional = [i for i, c in enumerate(circuits) if c.position_names]
        if positional:
            jobs = [([j], s) for j in range(len(positional)) for s in range(self.n_batches)]
            run = lambda job, part, abl: self._patched(part, abl, circuits[positional[job[0][0]]], complement)
            out[positional] = self._run_batches(jobs, run, len(positional), desc)
        return out

    @torch.no_grad()
    def mask_values(self, masks: torch.Tensor, chunk: int | None = None, desc: str | None = None) -> np.ndarray:
        """Per-example metric ``[C, N]`` for circuits given directly as bool ``[C, n_sources, n_destinations]``
        edge masks (fast for many large circuits, e.g. "everything but these edges").  Sparse circuits run
        node by node where that is cheaper (:meth:`_node_runs`), the others ``chunk`` stacked per pass."""
        chunk = chunk or self.circuits_per_pass
        by_nodes = self._node_runs(masks)
        rest = [i for i in range(masks.shape[0]) if i not in by_nodes]
        jobs = [([i], s) for i in by_nodes for s in range(self.n_batches)]
        jobs += [(rest[c:c + chunk], s) for c in range(0, len(rest), chunk) for s in range(self.n_batches)]
        dev = self.model.device

        def run(job, part, abl):
            idx = job[0]
            clean, last = part.clean.to(dev), part.last.to(dev)
            if idx[0] in by_nodes:
                return by_nodes[idx[0]].logits(clean, abl, last)[None]
            return self.engine.patched_run(clean, abl, self.engine.compile(masks[idx].to(dev)), logit_positions=last)

        return self._run_batches(jobs, run, masks.shape[0], desc)

    def _node_runs_of(self, mask: torch.Tensor) -> NodeRuns | None:
        """The circuit's :class:`NodeRuns` where runs by nodes may pay (:mod:`circuitgraph.engine.node_runs`):
        on a CPU (elsewhere many small operations cost more than their arithmetic), for a model without
        post-attention norms, a circuit of at most :data:`NODE_RUNS_AT_MOST` of the edges; else None."""
        if (self.model.device.type != "cpu" or not NodeRuns.applies(self.engine)
                or int(mask.sum()) > NODE_RUNS_AT_MOST * self.graph.n_edges):
            return None
        return NodeRuns(self.engine, mask)

    def _node_runs(self, masks: torch.Tensor) -> dict[int, NodeRuns]:
        """The circuits of ``masks`` that cost fewer multiply-adds computing only their nodes than in a
        patched run (:meth:`_node_runs_of`, :meth:`NodeRuns.cheaper`)."""
        B, P = min(self.batch_size, len(self.data)), self.data.clean.shape[1]
        runs = {i: self._node_runs_of(m) for i, m in enumerate(masks)}
        return {i: r for i, r in runs.items() if r is not None and r.cheaper(None, B * P, P)}

    def circuit_values(self, circuit: ResolvedCircuit, complement: bool = False) -> np.ndarray:
        """Per-example metric ``[N]`` of one circuit (or its complement), as :meth:`metric_values` gives it.

        The last :data:`MEMO_CIRCUITS` circuits' values are kept, so a circuit's score, its node and edge
        effects and its per-example view (``circuitgraph explore``) run it once."""
        h = hashlib.sha1(circuit.mask().numpy().tobytes())
        h.update(repr(sorted((k, tuple(v)) for k, v in circuit.edges.items() if v is not None)).encode())
        key = (h.hexdigest(), complement)
        if key in self._circuit_memo:
            self._circuit_memo.move_to_end(key)
        else:
            self._circuit_memo[key] = self.metric_values([circuit], complement=complement)[0]
            while len(self._circuit_memo) > MEMO_CIRCUITS:
                self._circuit_memo.popitem(last=False)
        return self._circuit_memo[key].copy()

    def _patched(self, part: TaskData, abl: Ablation, circuit: ResolvedCircuit, complement: bool):
        """Logits ``[1, B, vocab]`` of one position-restricted circuit (or its complement)."""
        dev = self.model.device
        masks = circuit.mask()[None]
        pos_masks = {}
        for (s, d), names in circuit.edges.items():
            if names is not None:
                pm = part.position_mask(names)
                pos_masks[(s, d)] = ~pm if complement else pm
                if complement:
                    masks[0, s, d] = True  # excluded below, then set per position
        if complement:
            masks = self.graph.legal[None] & ~masks
        plan = self.engine.compile(masks.to(dev), {k: v.to(dev) for k, v in pos_masks.items()} if pos_masks else None,
                                   batch=len(part), length=part.clean.shape[1])
        return self.engine.patched_run(part.clean.to(dev), abl, plan, logit_positions=part.last.to(dev))

    def resolve(self, circuit) -> ResolvedCircuit:
        """The circuit as edges of this model: a :class:`CircuitSpec`, a spec or MIB dict, a list of
        edge names, or a bool ``[n_sources, n_destinations]`` mask (see ``graph.sources`` /
        ``graph.destinations``).  Warns (:class:`CircuitWarning`) about specs that could mislead."""
        resolved, notes = self._resolve(circuit)
        for note in notes:
            warnings.warn(note, CircuitWarning, stacklevel=3)
        return resolved

    def _resolve(self, circuit) -> tuple[ResolvedCircuit, list[str]]:
        notes: list[str] = []
        if isinstance(circuit, dict):
            circuit = CircuitSpec.from_dict(circuit)
        elif isinstance(circuit, str):
            circuit = [circuit]
        if isinstance(circuit, (list, tuple, set)) and all(isinstance(e, str) for e in circuit):
            circuit = CircuitSpec(edges=list(dict.fromkeys(circuit)))
            if not circuit.edges:
                raise SpecError("the circuit is an empty list of edges")
        elif isinstance(circuit, (torch.Tensor, np.ndarray)):
            circuit = self._from_mask(torch.as_tensor(circuit))
        if isinstance(circuit, CircuitSpec):
            spec = circuit.require_selection()
            circuit = spec.resolve(self.graph)
            if len(circuit) == 0:
                raise SpecError(f"the spec selects no edge of the model (it holds {spec.contents()})")
            if (other := _other_model(spec.model, self.model.name)) is not None:
                notes.append(f"the spec is for model '{spec.model}' but is evaluated on '{other}'")
            named = [p for p in spec.metadata.get("spans") or [] if p != REST]
            if REST in circuit.position_names and named and set(named) != set(self.data.positions):
                notes.append(f"the spec's '{REST}' positions were every token but {', '.join(named)}; this dataset names "
                             f"{', '.join(sorted(self.data.positions)) or 'none'}, so here they are every token but those")
            if not _connects(circuit):
                notes.append(f"the circuit has no path from input to logits (it holds {spec.contents()}), so it carries "
                             f"no signal from the prompt to the answer; is the spec a fragment?")
        elif isinstance(circuit, ResolvedCircuit):
            if circuit.graph != self.graph:
                raise SpecError(f"the circuit was resolved for another model shape ({circuit.graph.n_layers} layers x "
                                f"{circuit.graph.n_heads} heads, this model has {self.graph.n_layers} x {self.graph.n_heads})")
        else:
            raise TypeError(f"cannot evaluate a {type(circuit).__name__}; expected a CircuitSpec, a spec dict, a list of "
                            f"edge names ('a0.h1->a1.h2<k>') or a bool mask [n_sources, n_destinations]")
        self.data.check_positions(circuit.position_names)
        return circuit, notes

    def _from_mask(self, mask: torch.Tensor) -> ResolvedCircuit:
        shape = tuple(self.graph.legal.shape)
        if tuple(mask.shape) != shape:
            raise SpecError(f"an edge mask must have shape {list(shape)} (graph.sources x graph.destinations), got {list(mask.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise SpecError("an edge mask must be boolean (or 0/1)")
            mask = mask.bool()
        bad = mask.cpu() & ~self.graph.legal
        if bad.any():
            s, d = torch.nonzero(bad)[0].tolist()
            raise SpecError(f"the mask selects {int(bad.sum())} pair(s) that are not edges, e.g. "
                            f"'{self.graph.sources[s]}->{self.graph.destinations[d]}'")
        edges = {tuple(sd): None for sd in torch.nonzero(mask.cpu()).tolist()}
        if not edges:
            raise SpecError("the edge mask selects no edge")
        return ResolvedCircuit(self.graph, edges)

    def evaluate(self, circuit) -> CircuitScore:
        """Faithfulness and necessity of one circuit, with bootstrap standard errors.

        ``circuit`` is anything :meth:`resolve` takes.  When the normalisation is undefined (clean
        and ablated metrics equal within noise) both ratios are ``None`` and ``undefined_reason``
        says why; with one example the standard errors are ``None``."""
        circuit, notes = self._resolve(circuit)
        m_circ = self.circuit_values(circuit)
        m_comp = self.circuit_values(circuit, complement=True)
        clean, base = self.clean_values, self.base_values
        undefined = self.undefined_reason
        one = len(self.data) < 2
        se_reason = "one example: no standard error" if one else None
        if undefined:
            notes.append(f"faithfulness and necessity are undefined: {undefined}")
            faith = nec = faith_se = nec_se = None
        else:
            faith = float(normalised(m_circ, clean, base))
            nec = 1.0 - float(normalised(m_comp, clean, base))
            faith_se = None if one else bootstrap_se(normalised, m_circ, clean, base)
            nec_se = None if one else bootstrap_se(lambda *a: 1 - normalised(*a), m_comp, clean, base)
        for note in notes:
            warnings.warn(note, CircuitWarning, stacklevel=2)
        sem = lambda x: None if one else float(np.std(x, ddof=1) / math.sqrt(len(x)))
        return CircuitScore(
            metric=self.metric_name, ablation=self.ablation_kind, n_examples=len(self.data),
            n_edges=len(circuit), n_edges_total=self.graph.n_edges,
            clean_metric=float(clean.mean()), corrupted_metric=float(base.mean()),
            circuit_metric=float(m_circ.mean()), complement_metric=float(m_comp.mean()),
            faithfulness=faith, faithfulness_se=faith_se, necessity=nec, necessity_se=nec_se,
            clean_metric_se=sem(clean), corrupted_metric_se=sem(base), circuit_metric_se=sem(m_circ),
            prepend_bos=self.data.prepend_bos, warnings=notes, undefined_reason=undefined, se_reason=se_reason,
            model=getattr(self.model, "name", None), quantization=getattr(self.model, "quantization", None))

    def faithfulness_of(self, circuits: list[ResolvedCircuit], desc: str | None = None) -> np.ndarray:
        """Faithfulness of many circuits (batched); NaN or infinite where :attr:`undefined_reason` is set."""
        vals = self.metric_values(circuits, desc=desc)
        return normalised(vals, self.clean_values[None], self.base_values[None])


def _other_model(spec_model: str | None, model_name: str) -> str | None:
    """``model_name`` when a spec's ``model`` names a different model (hub org and folders ignored)."""
    if not spec_model:
        return None
    key = lambda n: str(n).rstrip("/").rsplit("/", 1)[-1].lower()
    return None if key(spec_model) == key(model_name) else model_name


def _connects(circuit: ResolvedCircuit) -> bool:
    """Whether the circuit's edges hold a path from ``input`` to ``logits``."""
    import networkx as nx

    g = circuit.graph
    dg = nx.DiGraph((g.sources[s], g.node_of(g.destinations[d])) for s, d in circuit.edges)
    return "input" in dg and "logits" in dg and nx.has_path(dg, "input", "logits")
