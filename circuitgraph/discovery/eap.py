"""Edge attribution patching: EAP (Syed et al.) and EAP-IG (Hanna et al. 2024), inputs and activations.

An edge's score is ``(ablated_s - clean_s) . dM/dx_d`` summed over positions and averaged over
examples, where ``x_d`` is the destination's own input (each head's q, k and v input separately).
The gradients come from the ordinary shared forward: a head port's input gradient is the
gradient of its own projection pulled back through the port's input norm (a closed-form
vector-Jacobian product, one batched product for all ports of a layer), and each destination's
gradient is folded into the scores by a hook as soon as the backward produces it, so neither
per-port copies of the residual nor all destinations' gradients are ever held.  EAP-IG averages
the gradients over ``steps`` points between the ablated and the clean run; :func:`ig_alphas` says
where (ours by default, or the EAP-IG repository's).

Scores are summed in float64 (each destination's products in fp32) whatever the model's dtype,
and over ranks under ``torch.distributed`` (each rank attributes its share of the examples).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.discovery.edge_scores import EdgeScores


class _ScoreFolder:
    """Folds each destination's input gradient into the edge scores as the backward produces it,
    so no destination's gradient outlives its own hook (the lean part of the attribution)."""

    def __init__(self, engine, scores: torch.Tensor, deltas: torch.Tensor):
        self.e, self.scores, self.deltas = engine, scores, deltas  # deltas: [S, B*P*D], noising direction
        self.weight = 1.0

    def _add(self, first_dest: int, cols, grads: torch.Tensor):
        n_up = int(self.e.graph.n_upstream[first_dest])
        grads = grads.to(self.deltas.device).reshape(grads.shape[0], -1).float()
        self.scores[:n_up, cols] += (self.deltas[:n_up] @ grads.T).double().cpu() * self.weight

    def watch_heads(self, layer: int, x: torch.Tensor):
        G, H = self.e.graph, self.e.H
        base = G.head_dest(layer, 0, "q")

        def watch(q, k, v, pre):
            for kind, t in enumerate((q, k, v)):
                if t.requires_grad:
                    cols = base + 3 * torch.arange(H) + kind
                    t.register_hook(lambda g, kind=kind, cols=cols: self._add(
                        base, cols, self.e.kernel.port_input_grads(layer, kind, g, x.detach(), pre)))
        return watch

    def watch(self, t: torch.Tensor, dest: int) -> torch.Tensor:
        """``t`` as a destination's input: a view whose gradient is folded into column ``dest``."""
        t = t.view_as(t)
        if t.requires_grad:
            t.register_hook(lambda g: self._add(dest, [dest], g[None]))
        return t


def _lean_forward(engine, tokens, positions, fold: _ScoreFolder, emb=None, override: dict[int, torch.Tensor] | None = None,
                  fill: "_DeltaFiller | None" = None):
    """Logits at ``positions`` from the ordinary shared forward, with ``fold`` hooked on every
    destination input.  ``override[block]`` replaces a source block's output (the embedding, a layer's
    summed attention output incl. bias, or an MLP output) with a constant, for IG over activations.
    With ``fill`` (EAP: this forward is the clean run) it also writes the noising deltas as each source
    block is computed, so no separate clean run is needed.
    Returns ``(logits, leaf)``: differentiate the metric with respect to ``leaf`` to run the hooks."""
    k, G = engine.kernel, engine.graph
    override = override or {}
    emb = override.get(0, engine.w.embed(tokens) if emb is None else emb)
    leaf = emb.detach().requires_grad_(True)
    rope = k.rotary(tokens.shape[1], leaf)
    resid = leaf
    if fill:
        fill(leaf.detach()[None])
    heads = torch.arange(engine.H)
    for layer in range(len(engine.w.layers)):
        qkv = k.shared_qkv(layer, resid, watch=fold.watch_heads(layer, resid))
        mlp_dest = G.mlp_dest(layer)
        on_attn = None if fill is None else (lambda z, inv, layer=layer: fill.heads(k, layer, z, inv, heads))
        out = k.block(layer, resid, rope[layer], qkv=qkv, mlp_input=lambda mid, d=mlp_dest: fold.watch(mid, d),
                      attn_override=override.get(1 + 2 * layer), mlp_override=override.get(2 + 2 * layer), on_attn=on_attn)
        if fill:
            fill(out.mlp.detach()[None])
        resid = out.resid
    return k.unembed(fold.watch(resid, G.logits_dest), positions), leaf


IG_POINTS = ("right", "left")


def ig_alphas(steps: int, points: str = "right") -> list[float]:
    """Where EAP-IG takes its gradients, as fractions of the way from the ablated to the clean run.

    ``right`` (ours): ``k / steps`` for ``k = 1..steps`` -- ends at the clean run, as the integral's
    right Riemann sum, so one step is EAP.  ``left``: ``k = 0..steps-1`` -- starts at the ablated run;
    the EAP-IG repository's ``EAP-IG-inputs`` (which MIB ran, 5 steps) uses it.  (Its
    ``EAP-IG-activations`` uses ``right``.)"""
    if points not in IG_POINTS:
        raise ValueError(f"unknown IG points '{points}'; expected one of {', '.join(IG_POINTS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    first = 1 if points == "right" else 0
    return [k / steps for k in range(first, first + steps)]


def attribute(evaluator: Evaluator, method: str = "eap", steps: int = 5, progress: bool = True,
              ig_points: str = "right") -> EdgeScores:
    """Score every edge with ``eap``, ``eap-ig`` (IG over the input embeddings) or
    ``eap-ig-activations`` (IG over each source block's output, one block at a time, as in MIB);
    ``ig_points`` picks the IG step points (see :func:`ig_alphas`)."""
    if method not in ("eap", "eap-ig", "eap-ig-activations"):
        raise ValueError(f"unknown attribution method '{method}'; expected eap, eap-ig or eap-ig-activations")
    alphas = ig_alphas(steps, ig_points)
    ev, engine = evaluator, evaluator.engine
    G = engine.graph
    scores = torch.zeros(len(G.sources), len(G.destinations), dtype=torch.float64)
    n_points = 1 if method == "eap" else steps
    n_backward = 0
    bar = tqdm(total=ev.n_batches * (n_points if method != "eap-ig-activations" else n_points * len(engine.src_blocks)),
               desc=method, leave=False, disable=not progress)
    for i in range(ev.n_batches):
        part, abl, clean_logits = ev.batch(i)
        dev = ev.model.device
        toks, last = part.clean.to(dev), part.last.to(dev)
        ablated = abl.outputs  # None: zero ablation
        fill = None
        if method == "eap":  # the attribution forward is the clean run: it fills the deltas itself
            fill = _DeltaFiller.for_sources(len(G.sources), toks.new_empty(*toks.shape, engine.D, dtype=torch.float32), ablated)
            deltas = fill.deltas
        else:
            with torch.no_grad():
                _, clean_out = engine.run(toks, record=True)
                if method == "eap-ig":
                    clean_emb = clean_out[0][0]
                    abl_emb = torch.zeros_like(clean_emb) if ablated is None else ablated[0][0].expand_as(clean_emb)
                else:
                    summed = _block_outputs(engine, clean_out, ablated)
                deltas = _noising_deltas(clean_out, ablated)  # frees the recorded outputs block by block
        fold = _ScoreFolder(engine, scores, deltas)
        n_avg = n_points if method != "eap-ig-activations" else n_points * len(engine.src_blocks)
        fold.weight = 1.0 / n_avg

        def backward(fold=fold, **kw):
            nonlocal n_backward
            logits, leaf = _lean_forward(engine, toks, last, fold, **kw)
            metric = ev.metric(logits, part.to(dev), clean_logits).sum()
            torch.autograd.grad(metric, leaf, allow_unused=True)  # the hooks fold the gradients into the scores
            n_backward += 1
            bar.update(1)

        if method == "eap":
            backward(fill=fill)
        elif method == "eap-ig":
            for alpha in alphas:
                backward(emb=abl_emb + alpha * (clean_emb - abl_emb))
        else:
            for block, (c, z) in enumerate(summed):
                for alpha in alphas:
                    backward(override={block: z + alpha * (c - z)})
        del deltas, fold, fill
    bar.close()
    scores = ev.reduce(scores) / len(ev.data)
    n_backward = int(ev.reduce(torch.tensor([n_backward], dtype=torch.float64)).item())
    meta = {"steps": n_points, "metric": ev.metric_name, "ablation": ev.ablation_kind, "n_backward": n_backward,
            "n_examples": len(ev.data)}
    if method != "eap":
        meta["ig_points"] = ig_points
    return EdgeScores(G, scores, method, meta)


class _DeltaFiller:
    """Writes ``ablated - clean`` of each source block into the delta rows as the clean run produces it."""

    def __init__(self, deltas: torch.Tensor, ablated: list | None):
        self.deltas, self.ablated, self.block, self.row = deltas, ablated, 0, 0

    @classmethod
    def for_sources(cls, n_sources: int, like: torch.Tensor, ablated: list | None) -> "_DeltaFiller":
        """A filler with a fresh float32 buffer of ``n_sources`` rows, each the size of ``like`` ``[B, P, D]``."""
        return cls(torch.empty(n_sources, like.numel(), dtype=torch.float32, device=like.device), ablated)

    @torch.no_grad()
    def __call__(self, out: torch.Tensor):
        d = self.deltas[self.row:self.row + out.shape[0]].view(out.shape)
        if self.ablated is None:
            d.copy_(out).neg_()
        else:
            d.copy_(self.ablated[self.block].expand_as(out))
            d.sub_(out)
        self.block, self.row = self.block + 1, self.row + out.shape[0]

    @torch.no_grad()
    def heads(self, kernel, layer: int, z: torch.Tensor, inv, heads: torch.Tensor):
        self(kernel.head_outputs(layer, z.detach(), heads, None if inv is None else inv.detach()))


def _noising_deltas(clean_out: list, ablated: list | None) -> torch.Tensor:
    """``[n_sources, B*P*D]`` float32 ``ablated - clean`` per source, filled block by block while the
    recorded clean outputs are released (so the two are never held twice)."""
    fill = _DeltaFiller.for_sources(sum(o.shape[0] for o in clean_out), clean_out[0][0], ablated)
    for b in range(len(clean_out)):
        out, clean_out[b] = clean_out[b], None
        fill(out)
    return fill.deltas


def _block_outputs(engine, clean_out, ablated):
    """(clean, ablated) output of each source block as the forward adds it to the residual."""
    out = []
    if ablated is None:
        ablated = [torch.zeros_like(o[:, :1, :1]) for o in clean_out]
    for block, (c, z) in enumerate(zip(clean_out, ablated)):
        if block % 2 == 1:  # a layer's heads: summed, with the output bias
            lw = engine.w.layers[block // 2]
            b_O = lw.attn.b_O if lw.post_attn is None else None
            c, z = c.sum(0), z.expand_as(c).sum(0)
            if b_O is not None:
                c, z = c + b_O, z + b_O
        else:
            c, z = c[0], z[0].expand_as(c[0])
        out.append((c, z))
    return out

