"""Effects: the drop in faithfulness when a node or an edge is removed from a circuit, from one run of
the circuit per batch and one removal run (or resumed run) per removal."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitgraph.engine.node_runs import NodeRuns
from circuitgraph.errors import CircuitWarning
from circuitgraph.evaluate.baselines import bootstrap_se, normalised
from circuitgraph.graph.nodes import NodeRef
from circuitgraph.spec.circuit_spec import CircuitSpec, ResolvedCircuit


class Effects:
    """Node and edge effects of a circuit, and the per-example metric without each of some removals."""

    def edge_effects(self, circuit: CircuitSpec | ResolvedCircuit, chunk: int | None = None) -> dict[str, tuple[float, float]]:
        """Drop in faithfulness when each edge alone is removed from the circuit: ``{edge: (drop, se)}``."""
        circuit = self.resolve(circuit)
        keys = list(circuit.edges)
        return self._drops(circuit, [[k] for k in keys], circuit.edge_names, chunk, "edge effects")

    def node_effects(self, circuit: CircuitSpec | ResolvedCircuit, chunk: int | None = None) -> dict[str, tuple[float, float]]:
        """Drop in faithfulness when every edge into or out of a node is removed."""
        circuit = self.resolve(circuit)
        by_node = self._node_removals(circuit)
        return self._drops(circuit, list(by_node.values()), list(by_node), chunk, "node effects")

    def effects(self, circuit: CircuitSpec | ResolvedCircuit, edges: bool = True,
                chunk: int | None = None) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
        """``(node_effects, edge_effects)`` of one circuit (``edge_effects`` empty with ``edges=False``): the
        same numbers as the two methods give, from one set of runs (the circuit's own run, paused once per
        layer and batch, serves both)."""
        circuit = self.resolve(circuit)
        by_node = self._node_removals(circuit)
        removals, names = list(by_node.values()), list(by_node)
        if edges:
            removals += [[k] for k in circuit.edges]
            names += circuit.edge_names
        drops = self._drops(circuit, removals, names, chunk, "node and edge effects", keyed=False)
        n = len(by_node)
        return dict(zip(names[:n], drops[:n])), dict(zip(names[n:], drops[n:]))

    def _node_removals(self, circuit: ResolvedCircuit) -> dict[str, list]:
        """Every node of the circuit but input and logits, with the circuit's edges into or out of it."""
        g = self.graph
        by_node: dict[str, list] = {}
        for s, d in circuit.edges:
            for node in (g.sources[s], g.node_of(g.destinations[d])):
                if node not in ("input", "logits"):
                    by_node.setdefault(node, []).append((s, d))
        return by_node

    def _drops(self, circuit, removals, names, chunk, desc, keyed: bool = True):
        if self.undefined_reason:
            warnings.warn(f"effects are undefined (NaN): {self.undefined_reason}", CircuitWarning, stacklevel=3)
        full = self.circuit_values(circuit)
        reduced = self.values_without(circuit.mask(), removals, chunk, desc,
                                      position_edges={k: v for k, v in circuit.edges.items() if v is not None})
        clean, base = self.clean_values, self.base_values
        drop = lambda f, r, c, b: normalised(f, c, b) - normalised(r, c, b)
        out = [(float(drop(full, row, clean, base)), bootstrap_se(drop, full, row, clean, base)) for row in reduced]
        return dict(zip(names, out)) if keyed else out

    @torch.no_grad()
    def values_without(self, mask: torch.Tensor, removals: list, chunk: int | None = None, desc: str | None = None,
                       positions: list[str] | None = None, position_edges: dict | None = None) -> np.ndarray:
        """Per-example metric ``[R, N]`` of a circuit without each removal (a list of its ``(source,
        destination)`` edges; with ``positions``, removed at those named positions only, as path
        patching does).  The circuit is ``mask`` (bool ``[n_sources, n_destinations]``, edges at every
        position) plus ``position_edges`` (``{edge: position names}``, edges at those positions only).

        On a CPU, a removal that is cheaper so (:meth:`NodeRuns.cheaper`: a sparse circuit's, of a model
        without post-attention norms) recomputes only the circuit's nodes it changes, from the deltas of the
        circuit's own run (:mod:`circuitgraph.engine.node_runs`).  Otherwise: nothing before the first layer
        a removal changes can differ from the circuit's own run, so each removal resumes from that run paused there (paused at each such layer in turn, once per batch),
        ``chunk`` at a time (default :attr:`circuits_per_pass`: on GPT-2 small over 16 x 16 tokens,
        resumed removals from MIB's IOI circuit ran 1.14-1.19x faster one by one than 16 stacked; nearly
        complete circuits, as in path patching, stack better: see :attr:`trials_per_pass`).  With
        positions the removals run one at a time, their plans built per batch from its positions.  Removals
        of the same edges (a node with one edge, and that edge) run once."""
        first = {}  # a removal's edges -> the first removal of them
        same = [first.setdefault(frozenset(map(tuple, r)), i) for i, r in enumerate(removals)]
        if len(first) < len(removals):
            unique = list(first.values())
            vals = self.values_without(mask, [removals[i] for i in unique], chunk, desc, positions, position_edges)
            row = {i: j for j, i in enumerate(unique)}
            return vals[[row[i] for i in same]]
        e, dev = self.engine, self.model.device
        positional = bool(positions) or bool(position_edges)
        if not positional and dev.type == "cpu" and NodeRuns.applies(e):
            runs = NodeRuns(e, mask)
            B, P = min(self.batch_size, len(self.data)), self.data.clean.shape[1]
            here = [i for i, r in enumerate(removals) if runs.cheaper(r, B * P, P)]
            if here:
                out = np.zeros((len(removals), len(self.data)), dtype=np.float64)
                out[here] = self._values_recomputing_changed(runs, mask, [removals[i] for i in here], desc)
                rest = [i for i in range(len(removals)) if i not in set(here)]
                if rest:
                    out[rest] = self._values_resumed(mask, [removals[i] for i in rest], chunk, desc)
                return out
        return self._values_resumed(mask, removals, chunk, desc, positions, position_edges)

    def _values_resumed(self, mask: torch.Tensor, removals: list, chunk: int | None, desc: str | None,
                        positions: list[str] | None = None, position_edges: dict | None = None) -> np.ndarray:
        """:meth:`values_without` by runs resumed from the circuit's own run paused at each removal's first layer."""
        G, e, dev = self.graph, self.engine, self.model.device
        position_edges = position_edges or {}
        positional = bool(positions) or bool(position_edges)
        dst_layer = [NodeRef.parse(d).block_layer(G.n_layers) for d in G.destinations]
        by_layer: dict[int, list[int]] = {}
        for i, r in enumerate(removals):
            by_layer.setdefault(min(dst_layer[d] for _, d in r), []).append(i)
        chunk = 1 if positional else chunk or self.circuits_per_pass

        def without(idx: list[int]) -> torch.Tensor:
            masks = mask[None].repeat(len(idx), 1, 1)
            for j, i in enumerate(idx):
                for src, dst in removals[i]:
                    masks[j, src, dst] = False
            return masks.to(dev)

        chunks = {layer: [todo[c:c + chunk] for c in range(0, len(todo), chunk)] for layer, todo in by_layer.items()}
        plans = {} if positional else {tuple(idx): e.compile(without(idx)) for cs in chunks.values() for idx in cs}
        plain = None if position_edges else e.compile(mask[None].to(dev))
        bases = {}  # batch -> (its position masks of the circuit's edges, the circuit's plan)
        out = np.zeros((len(removals), len(self.data)), dtype=np.float64)
        jobs = [(s, layer) for s in range(self.n_batches) for layer in sorted(chunks)]  # a batch's layers in order
        state = None
        for s, layer in tqdm(jobs, desc=desc or "patched runs", leave=False, disable=not self.progress or len(jobs) < 2):
            a, b = self._spans()[s]
            part, abl, clean_logits = self._batch(s, a, b)
            clean, last = part.clean.to(dev), part.last.to(dev)
            if s not in bases:
                at = {edge: part.position_mask(list(names)).to(dev) for edge, names in position_edges.items()}
                bases[s] = at, plain if plain is not None else e.compile(mask[None].to(dev), at, *clean.shape)
                state = None
            at, base = bases[s]
            # the circuit's run paused at this layer: the batch's previous pause carried on from where it stopped
            state = e.patched_run(clean, abl, base, start=state, stop_layer=layer)
            kept_at = ~part.position_mask(list(positions)).to(dev) if positions else None  # where removed edges stay
            for idx in chunks[layer]:
                if positional:
                    removed = set(removals[idx[0]])
                    pos = {edge: pm for edge, pm in at.items() if edge not in removed}
                    pos.update({edge: kept_at for edge in removed} if positions else {})
                    trial = e.compile(without(idx), pos or None, *clean.shape)
                else:
                    trial = plans[tuple(idx)]
                logits = e.patched_run(clean, abl, trial, logit_positions=last, start=state)
                out[idx, a:b] = self._values(logits, part, clean_logits.expand(len(idx), -1, -1)).numpy()
        return self.reduce(out)

    def _values_recomputing_changed(self, runs: NodeRuns, mask: torch.Tensor, removals: list, desc: str | None) -> np.ndarray:
        """:meth:`values_without` by :class:`~circuitgraph.engine.node_runs.NodeRuns`: per batch, the circuit's
        run once, then each removal recomputes only the nodes it changes (a removal that changes nothing
        reaching the logits keeps the circuit's own values).  On a CPU, one circuit at a time: the 378
        removals of a 300-edge SmolLM2-135M circuit over 16 IOI rows took 0.38x as long as resumed runs
        (``benchmarks/bench_explore.py``)."""
        e, dev = self.engine, self.model.device
        own = self.circuit_values(self._from_mask(mask))
        out = np.zeros((len(removals), len(self.data)), dtype=np.float64)
        plan = e.compile(mask[None].to(dev))
        jobs = [(s, i) for s in range(self.n_batches) for i in range(len(removals))]
        deltas = None
        for s, i in tqdm(jobs, desc=desc or "patched runs", leave=False, disable=not self.progress or len(jobs) < 2):
            a, b = self._spans()[s]
            part, abl, clean_logits = self._batch(s, a, b)
            clean, last = part.clean.to(dev), part.last.to(dev)
            if i == 0:
                deltas = e.patched_run(clean, abl, plan, stop_layer=self.graph.n_layers).flat
            logits = runs.logits(clean, abl, last, deltas, removals[i])
            out[i, a:b] = own[a:b] if logits is None else self._values(logits[None], part, clean_logits[None]).numpy()[0]
        return self.reduce(out)
