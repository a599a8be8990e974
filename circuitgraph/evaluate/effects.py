"""Effects: the drop in faithfulness when a node or an edge is removed from a circuit, from one run of
the circuit per batch and one removal run (or resumed run) per removal."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from circuitgraph.engine.node_runs import NodeRuns
from circuitgraph.errors import CircuitWarning
from circuitgraph.evaluate.baselines import bootstrap_se, normalised
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
        destination)`` edges, possibly none; with ``positions``, removed at those named positions only, as
        path patching does).  The circuit is ``mask`` (bool ``[n_sources, n_destinations]``, edges at every
        position) plus ``position_edges`` (``{edge: position names}``, edges at those positions only).
        The one resumed loop: node and edge effects, path patching, ACDC and exact edge effects use it.

        Nothing before the first layer a removal changes can differ from the circuit's own run, so each
        removal resumes from that run paused there (:meth:`_prefix`: read off the clean run while the circuit
        holds every edge into earlier layers, else the circuit's run paused at each such layer in turn, once
        per batch), ``chunk`` at a time (default :attr:`circuits_per_pass`: on GPT-2 small over 16 x 16
        tokens, resumed removals from MIB's IOI circuit ran 1.14-1.19x faster one by one than 16 stacked;
        nearly complete circuits, as in path patching, stack better: see :attr:`trials_per_pass`).  With
        positions the removals run one at a time, their plans built per batch from its positions.

        On a CPU, when it costs fewer multiply-adds all told (:meth:`NodeRuns.costs`, the circuit's own run
        included: the removals of a sparse circuit, of a model without post-attention norms), removals
        instead recompute only the circuit's nodes they change, from the deltas of the circuit's own run
        (:mod:`circuitgraph.engine.node_runs`).  Removals of the same edges (a node with one edge, and that
        edge) run once."""
        first = {}  # a removal's edges -> the first removal of them
        same = [first.setdefault(frozenset(map(tuple, r)), i) for i, r in enumerate(removals)]
        if len(first) < len(removals):
            unique = list(first.values())
            vals = self.values_without(mask, [removals[i] for i in unique], chunk, desc, positions, position_edges)
            row = {i: j for j, i in enumerate(unique)}
            return vals[[row[i] for i in same]]
        here, runs = ([], None) if positions or position_edges else self._by_nodes(mask, removals)
        out = np.zeros((len(removals), len(self.data)), dtype=np.float64)
        if here:
            out[here] = self._values_by_nodes(runs, mask, [removals[i] for i in here], desc)
        rest = [i for i in range(len(removals)) if i not in set(here)]
        if rest:
            out[rest] = self._values_resumed(mask, [removals[i] for i in rest], chunk, desc, positions, position_edges)
        return out

    def _by_nodes(self, mask: torch.Tensor, removals: list) -> tuple[list[int], NodeRuns | None]:
        """The removals to run by :class:`NodeRuns` (see :meth:`values_without`), with the circuit's runs:
        those cheaper so, when they together save more than the circuit's own run costs."""
        runs = self._node_runs_of(mask) if len(removals) > 1 else None  # one removal never repays the circuit's run
        if runs is None:
            return [], None
        B, P = min(self.batch_size, len(self.data)), self.data.clean.shape[1]
        costs = [runs.costs(r, B * P, P) for r in removals]
        chosen = [i for i, (here, resumed) in enumerate(costs) if here <= resumed]
        saved = sum(costs[i][1] - costs[i][0] for i in chosen)
        return (chosen, runs) if saved > runs.costs(None, B * P, P)[1] else ([], None)

    def _prefix(self, s: int, part, abl, layer: int, mask: torch.Tensor, plan, previous):
        """Batch ``s``'s prefix state at ``layer`` of the circuit ``mask`` (``plan()``: compiled for the batch,
        with any edges it holds at some positions only): read off the batch's clean run, cached, while
        ``mask`` holds every edge into earlier layers (at every position: ACDC, exact effects, path
        patching); else the circuit's run paused there, carried on from ``previous``."""
        G, dev = self.graph, self.model.device
        before = G.head_dest(layer, 0, "q") if layer < G.n_layers else G.logits_dest
        if torch.equal(mask[:, :before].cpu(), G.legal[:, :before]):
            states = self._clean_prefixes.get(s)
            if states is None:
                _, outs = self.engine.run(part.clean.to(dev), record=True)
                states = self.engine.clean_states(outs, abl)
                if self._cache_ok:
                    self._clean_prefixes[s] = states
            return states[layer]
        return self.engine.pause(part.clean.to(dev), abl, plan(), layer, start=previous)

    def _values_resumed(self, mask: torch.Tensor, removals: list, chunk: int | None, desc: str | None,
                        positions: list[str] | None = None, position_edges: dict | None = None) -> np.ndarray:
        """:meth:`values_without` by patched runs resumed from the circuit's own run paused at each removal's first layer."""
        G, e, dev = self.graph, self.engine, self.model.device
        per_layer = 3 * G.n_heads + 1  # destinations of a layer: its head ports and its MLP (the logits: n_layers)
        by_layer: dict[int, list[int]] = {}
        for i, r in enumerate(removals):
            by_layer.setdefault(min((d // per_layer for _, d in r), default=G.n_layers), []).append(i)
        position_edges = position_edges or {}
        positional = bool(positions) or bool(position_edges)
        chunk = 1 if positional else chunk or self.circuits_per_pass

        def without(idx: list[int]) -> torch.Tensor:
            masks = mask[None].repeat(len(idx), 1, 1)
            for j, i in enumerate(idx):
                for src, dst in removals[i]:
                    masks[j, src, dst] = False
            return masks.to(dev)

        chunks = {layer: [todo[c:c + chunk] for c in range(0, len(todo), chunk)] for layer, todo in by_layer.items()}
        plans = {} if positional else {tuple(idx): e.compile(without(idx)) for cs in chunks.values() for idx in cs}
        bases: dict = {}  # batch -> its position masks of the circuit's edges
        circuit_plans: dict = {}  # the circuit's own plan, compiled once a pause needs it: per batch with edges at positions
        state: list = [None]  # the batch's last prefix state, carried on to its next layer

        def circuit_plan(s: int, shape):
            key = s if position_edges else None
            if key not in circuit_plans:
                circuit_plans[key] = e.compile(mask[None].to(dev), bases[s] or None, *shape)
            return circuit_plans[key]

        def run(job, part, abl):
            idx, s, layer, first = job
            clean, last = part.clean.to(dev), part.last.to(dev)
            if s not in bases:
                bases[s] = {edge: part.position_mask(list(names)).to(dev) for edge, names in position_edges.items()}
                state[0] = None
            at = bases[s]
            if first:  # the batch's first chunk at this layer
                state[0] = self._prefix(s, part, abl, layer, mask, lambda: circuit_plan(s, clean.shape), state[0])
            if positional:
                kept_at = ~part.position_mask(list(positions)).to(dev) if positions else None  # where removed edges stay
                removed = set(removals[idx[0]])
                pos = {edge: pm for edge, pm in at.items() if edge not in removed}
                # a removed edge stays where it was and is not removed (an edge of the circuit at positions: at those)
                pos.update({edge: kept_at & at[edge] if edge in at else kept_at for edge in removed} if positions else {})
                trial = e.compile(without(idx), pos or None, *clean.shape)
            else:
                trial = plans[tuple(idx)]
            return e.patched_run(clean, abl, trial, logit_positions=last, start=state[0])

        # a batch's layers in order, so each pause carries on from the last
        jobs = [(idx, s, layer, k == 0) for s in range(self.n_batches) for layer in sorted(chunks)
                for k, idx in enumerate(chunks[layer])]
        return self._run_batches(jobs, run, len(removals), desc)

    def _values_by_nodes(self, runs: NodeRuns, mask: torch.Tensor, removals: list, desc: str | None) -> np.ndarray:
        """:meth:`values_without` by :class:`~circuitgraph.engine.node_runs.NodeRuns`: per batch, the circuit's
        run once, then each removal recomputes only the nodes it changes (a removal that changes nothing
        reaching the logits keeps the circuit's own values).  On a CPU, one circuit at a time: the 378
        removals of a 300-edge SmolLM2-135M circuit over 16 IOI rows took 0.38x as long as resumed runs
        (``benchmarks/bench_explore.py``)."""
        e, dev = self.engine, self.model.device
        own = self.circuit_values(self._from_mask(mask))
        plan = e.compile(mask[None].to(dev))
        deltas: list = [None]

        def run(job, part, abl):
            (i,), s = job
            clean = part.clean.to(dev)
            if i == 0:  # the batch's first removal: the circuit's own run, every delta
                deltas[0] = e.pause(clean, abl, plan, self.graph.n_layers).flat
            logits = runs.logits(clean, abl, part.last.to(dev), deltas[0], removals[i])
            return None if logits is None else logits[None]

        jobs = [([i], s) for s in range(self.n_batches) for i in range(len(removals))]
        return self._run_batches(jobs, run, len(removals), desc, fallback=own)
