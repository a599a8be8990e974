"""Runs of a circuit that compute only its nodes: the circuit itself (a sparse one), or the circuit
without a few of its edges, recomputing only what the removal changes.

A patched run computes every head and MLP, though only the circuit's nodes that reach the logits
matter (every other node's output enters no destination's input).  Here a sparse circuit's run
computes just those, from the all-ablated run (where every delta is zero), each input by the
definition ``x_d = A_d + sum of delta_s over the edges into d``.

Removing edges from a circuit changes the inputs of the removed edges' destinations, then those of
the circuit's nodes downstream of them, and nothing else: every other node's delta (patched minus
ablated output) is the circuit's own.  So a removal run starts from the deltas of the circuit's run
and recomputes, layer by layer, only the nodes that descend from a removed edge and still reach the
logits.  A node read (through the circuit) only at the logit positions is needed there alone: an MLP
is computed at those positions only, a head's queries may be stale elsewhere (each query position
attends alone).

A removal run of a sparse circuit computes a few heads and MLPs where a resumed run computes every
layer after the first changed one (node and edge effects of a 300-edge SmolLM2-135M circuit: see
``benchmarks/bench_explore.py``).  Models whose attention output is normalised as a whole
(post-attention norms) tie every head of a layer together and are not run this way (:meth:`applies`).
"""

from __future__ import annotations

import torch

from circuitgraph.engine.ablation import Ablation

# multiply-adds that the dozen small operations of one recomputed node cost beyond their arithmetic
# (about 20 microseconds of dispatch at a CPU's 10 GMAC/s)
NODE_OVERHEAD = 200_000


class NodeRuns:
    """Logits of one circuit (bool ``mask [n_sources, n_destinations]``), computing only its nodes, or of
    the circuit without given edges, from the deltas of the circuit's own run (:attr:`PrefixState.flat`
    of it paused after its last layer)."""

    def __init__(self, engine, mask: torch.Tensor):
        self.e, self.k, G = engine, engine.kernel, engine.graph
        self.H, self.n_layers = G.n_heads, G.n_layers
        mask = (mask.cpu().bool() & G.legal)
        self.logits_dest = G.logits_dest
        self.into: dict[int, list[int]] = {}  # destination -> the circuit's sources into it
        self.out_of: dict[int, list[int]] = {}  # source -> the circuit's destinations it feeds
        for s, d in torch.nonzero(mask).tolist():
            self.into.setdefault(d, []).append(s)
            self.out_of.setdefault(s, []).append(d)
        # whether a source's delta is read anywhere but at the logit positions: by a key or value, or by a
        # node that is (reverse source order is reverse topological order)
        self.everywhere: dict[int, bool] = {}
        for s in sorted(self.out_of, reverse=True):
            self.everywhere[s] = any(self._kind(d) in (1, 2) or self.everywhere.get(self.node_of(d), False)
                                     for d in self.out_of[s])

    def cheaper(self, removed: list[tuple[int, int]] | None, tokens: int, length: int) -> bool:
        """Whether this run (without ``removed``; the whole circuit when None) costs no more than the patched
        run it replaces (:meth:`costs`).  A sparse circuit and its removals are cheaper here; a dense
        circuit, or removals from a nearly complete one (path patching), not."""
        here, patched = self.costs(removed, tokens, length)
        return here <= patched

    def costs(self, removed: list[tuple[int, int]] | None, tokens: int, length: int) -> tuple[float, float]:
        """Multiply-adds per token of this run (without ``removed``; the whole circuit when None) and of a
        patched run resumed at the removal's first layer (from the embedding when None): every head and
        MLP from there on, each destination mixing the fewer of the circuit's sources into it and the
        others.  Over ``tokens`` tokens of prompts ``length`` long; each node computed here also pays a
        fixed cost for its dozen small operations (:data:`NODE_OVERHEAD`)."""
        gone = set(map(tuple, removed or ()))
        e, H, D = self.e, self.H, self.e.D
        head, mlp = 4 * D * e.dh, self._mlp_macs
        n_in = lambda d: sum((s, d) not in gone for s in self.into.get(d, ()))
        nodes, logits_changed = self.changed(removed)
        if not nodes and not logits_changed:  # nothing to run
            return 0.0, 0.0
        here = n_in(self.logits_dest) * D
        for n in nodes:
            share = 1.0 if self.everywhere.get(n, False) else 1 / length
            dests = self._dests(n)
            here += (head if len(dests) == 3 else mlp * share) + sum(n_in(d) for d in dests) * D + NODE_OVERHEAD / tokens
        first = min((d // (3 * H + 1) for _, d in gone), default=self.n_layers) if removed is not None else 0
        n_up = self.e.graph.n_upstream.tolist()
        resumed = (self.n_layers - first) * (H * head + mlp)
        for d in range(first * (3 * H + 1), self.logits_dest + 1):
            k = n_in(d)
            resumed += min(k, n_up[d] - k) * D
        return here, resumed

    @property
    def _mlp_macs(self) -> int:
        """Multiply-adds per token of one MLP (a gated MLP's three projections; 4 x d_model neurons when unknown)."""
        down = self.e.w.layers[0].mlp_down
        neurons = down.weight.shape[1] if down is not None else 4 * self.e.D
        return 3 * self.e.D * neurons

    @staticmethod
    def applies(engine) -> bool:
        """Whether each head's output depends on its own inputs alone (no post-attention norm)."""
        return all(lw.post_attn is None for lw in engine.w.layers)

    # ----- the graph ---------------------------------------------------------------------------
    def node_of(self, d: int) -> int:
        """The source index of destination ``d``'s node (a head for its ports, an MLP), -1 for the logits."""
        if d == self.logits_dest:
            return -1
        layer, local = divmod(d, 3 * self.H + 1)
        return 1 + layer * (self.H + 1) + min(local // 3, self.H)

    def _kind(self, d: int) -> int:
        """0, 1, 2 for a query, key or value port; 3 for an MLP or the logits."""
        local = d % (3 * self.H + 1) if d != self.logits_dest else 3 * self.H
        return 3 if local == 3 * self.H else local % 3

    def _dests(self, node: int) -> list[int]:
        layer, within = divmod(node - 1, self.H + 1)
        first = layer * (3 * self.H + 1) + 3 * within
        return [first] if within == self.H else [first, first + 1, first + 2]

    def changed(self, removed: list[tuple[int, int]] | None) -> tuple[list[int], bool]:
        """``(nodes to recompute in source order, whether the logits' input changes)`` without ``removed``;
        every node that reaches the logits when ``removed`` is None (the circuit run from the ablated one)."""
        gone = set(map(tuple, removed or ()))
        into = lambda d: [s for s in self.into.get(d, ()) if (s, d) not in gone]
        reach, todo = set(), into(self.logits_dest)  # nodes with a path to the logits
        while todo:
            n = todo.pop()
            if n not in reach and n != 0:
                reach.add(n)
                todo += [s for d in self._dests(n) for s in into(d)]
        if removed is None:
            return sorted(reach), True
        hit, todo = set(), [self.node_of(d) for _, d in gone]  # nodes downstream of a removed edge
        while todo:
            n = todo.pop()
            if n not in hit:
                hit.add(n)
                todo += [self.node_of(d) for d in self.out_of.get(n, ()) if (n, d) not in gone] if n != -1 else []
        nodes = sorted(hit & reach)
        return nodes, -1 in hit

    # ----- the run ---------------------------------------------------------------------------
    def logits(self, tokens: torch.Tensor, ablation: Ablation, logit_positions: torch.Tensor,
               deltas: torch.Tensor | None = None, removed: list[tuple[int, int]] | None = None) -> torch.Tensor | None:
        """Logits ``[B, vocab]`` at ``logit_positions`` of the circuit (``deltas`` None), or of the circuit
        without the ``removed`` edges given ``deltas`` ``[n_sources, B, P, D]``, every source's delta in the
        circuit's run; ``None`` when nothing that reaches the logits changes (the circuit's logits stand)."""
        nodes, logits_changed = self.changed(None if deltas is None else removed)
        if not nodes and not logits_changed:
            return None
        gone = set(map(tuple, removed or ()))
        B, P = tokens.shape
        dev = ablation.resid[0].device
        at = (torch.arange(B, device=dev), logit_positions.to(dev))
        own: dict[int, torch.Tensor] = {}  # recomputed deltas
        if deltas is None:  # from the ablated run: the input's delta, then every node that reaches the logits
            emb = self.e.w.embed(tokens.to(dev))
            own[0] = emb if ablation.outputs is None else emb - ablation.outputs[0][0]

        def x_in(d: int, base: torch.Tensor, only_at: bool) -> torch.Tensor:
            """Destination ``d``'s input (``[B, D]`` at the logit positions when ``only_at``, else ``[B, P, D]``)."""
            x = base.expand(B, P, -1)
            x = (x[at] if only_at else x).clone()
            rows = [s for s in self.into.get(d, ()) if (s, d) not in gone]
            kept = [s for s in rows if s not in own]
            pick = (lambda t: t[at]) if only_at else (lambda t: t)
            if len(kept) == 1:
                x += pick(deltas[kept[0]])
            elif kept:
                idx = torch.tensor(kept, device=deltas.device)
                x += (deltas[idx[:, None], at[0][None], at[1][None]] if only_at else deltas[idx]).sum(0)
            for s in rows:
                if s in own:
                    x += pick(own[s])
            return x

        rope = None
        for layer in sorted({(n - 1) // (self.H + 1) for n in nodes}):
            first = 1 + layer * (self.H + 1)
            heads = [n - first for n in nodes if first <= n < first + self.H]
            if heads:
                rope = rope if rope is not None else self.k.rotary(P, ablation.resid[0])
                own.update(self._heads(layer, heads, ablation, rope[layer], x_in))
            mlp = first + self.H
            if mlp in nodes:
                own[mlp] = self._mlp(layer, mlp, ablation, x_in, deltas, at, P)
        x = x_in(self.logits_dest, ablation.resid[-1], True)
        return self.k.unembed(x)

    def _heads(self, layer: int, heads: list[int], ablation: Ablation, rope, x_in) -> dict[int, torch.Tensor]:
        """Deltas of ``heads`` of ``layer``, every port's input built from the current deltas."""
        H, first = self.H, 1 + layer * (self.H + 1)
        d0 = layer * (3 * H + 1)
        base = ablation.resid[2 * layer]
        x = torch.stack([x_in(d0 + 3 * h + kind, base, False) for h in heads for kind in range(3)])
        ports = torch.tensor([3 * h + kind for h in heads for kind in range(3)])
        vals = self.k.port_qkv(layer, x, ports)  # [3n, B, P, dh]
        q, k, v = (vals[kind::3].transpose(0, 1) for kind in range(3))
        z = self.k.attend(layer, q, k, v, rope)  # [B, n, P, dh]
        idx = torch.tensor(heads)
        z_all = z.new_zeros(z.shape[0], H, *z.shape[2:])
        z_all[:, idx.to(z.device)] = z
        out = self.k.head_outputs(layer, z_all, idx)  # [n, B, P, D]
        abl = ablation.outputs[1 + 2 * layer] if ablation.outputs is not None else None
        if abl is not None:
            out = out - abl[idx.to(abl.device)]
        return {first + h: out[i] for i, h in enumerate(heads)}

    def _mlp(self, layer: int, node: int, ablation: Ablation, x_in, deltas: torch.Tensor | None, at, P: int) -> torch.Tensor:
        """The delta of ``layer``'s MLP ``[B, P, D]``; computed at the logit positions alone when nothing
        reads it elsewhere (its other positions then keep the circuit's values, or zeros, which nothing reads)."""
        d = layer * (3 * self.H + 1) + 3 * self.H
        base = ablation.resid[2 * layer + 1]
        abl = ablation.outputs[2 + 2 * layer][0] if ablation.outputs is not None else None
        if self.everywhere.get(node, False):
            out = self.k.mlp_out(layer, x_in(d, base, False))
            return out if abl is None else out - abl
        out = self.k.mlp_out(layer, x_in(d, base, True)[:, None])[:, 0]  # [B, D]
        B = len(at[0])
        if abl is not None:
            out = out - abl.expand(B, P, -1)[at]
        delta = deltas[node].clone() if deltas is not None else out.new_zeros(B, P, out.shape[-1])
        delta[at] = out
        return delta
