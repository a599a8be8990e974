"""Edge attribution patching: EAP (Syed et al.) and EAP-IG (Hanna et al. 2024), inputs and activations.

An edge's score is ``(ablated_s - clean_s) . dM/dx_d`` summed over positions and averaged over
examples, where ``x_d`` is the destination's own input (each head's q, k and v input separately).
The gradients come from one differentiable forward in which every destination reads the shared
residual plus a zero "probe" tensor of its own; the probes' gradients are the per-destination
input gradients.  EAP-IG averages the gradients over ``steps`` points between the ablated and
the clean run; :func:`ig_alphas` says where (ours by default, or the EAP-IG repository's).

Scores are summed in float64 (each block's products in fp32) whatever the model's dtype, and over
ranks under ``torch.distributed`` (each rank attributes its share of the examples).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from circuitgraph.evaluate.evaluator import Evaluator, _on
from circuitgraph.discovery.edge_scores import EdgeScores


def _probed_forward(engine, tokens, positions, emb=None, override: dict[int, torch.Tensor] | None = None):
    """Logits at ``positions`` with a zero probe added to every destination input.

    ``override[block]`` replaces a source block's output (the embedding, a layer's summed attention
    output incl. bias, or an MLP output) with a constant, for IG over activations.
    Returns ``(logits, probes)`` with one probe ``[n, B, P, D]`` per destination block.
    """
    k, H = engine.kernel, engine.H
    B, P = tokens.shape
    emb = engine.w.embed(tokens) if emb is None else emb
    override = override or {}
    if 0 in override:
        emb = override[0]
    rope = k.rotary(P, emb)
    probes = [torch.zeros(b - a, B, P, engine.D, dtype=emb.dtype, device=emb.device, requires_grad=True) for a, b in engine.dst_blocks]
    resid = emb
    ports = torch.arange(3 * H)
    for layer in range(len(engine.w.layers)):
        qkv = k.port_qkv(layer, resid[None] + probes[2 * layer], ports)  # [3H, B, P, dh], head-major / port-minor
        qkv = qkv.view(H, 3, B, P, engine.dh).permute(1, 2, 0, 3, 4)
        probe = probes[2 * layer + 1][0]
        out = k.block(layer, resid, rope[layer], qkv=(qkv[0], qkv[1], qkv[2]), mlp_input=lambda mid, probe=probe: mid + probe,
                      attn_override=override.get(1 + 2 * layer), mlp_override=override.get(2 + 2 * layer))
        resid = out.resid
    final = resid + probes[-1][0]
    logits = k.unembed(final, positions)
    return logits, probes


def _accumulate(engine, scores, deltas, grads):
    """scores[s, d] += sum_{b,p} delta_s . grad_d over each destination block's upstream sources."""
    flat = torch.cat([d.reshape(d.shape[0], -1) for d in deltas])  # [S, B*P*D]
    for (a, b), g in zip(engine.dst_blocks, grads):
        n_up = int(engine.graph.n_upstream[a])
        scores[:n_up, a:b] += flat[:n_up] @ g.reshape(b - a, -1).T


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
    scores = torch.zeros(len(G.sources), len(G.destinations), dtype=torch.float64, device=ev.model.device)
    n_points = 1 if method == "eap" else steps
    n_backward = 0
    spans = ev._spans()
    bar = tqdm(total=len(spans) * (n_points if method != "eap-ig-activations" else n_points * len(engine.src_blocks)),
               desc=method, leave=False, disable=not progress)
    for i, (a, b) in enumerate(spans):
        part, abl, clean_logits = ev._batch(i, a, b)
        dev = ev.model.device
        toks, last = part.clean.to(dev), part.last.to(dev)
        with torch.no_grad():
            _, clean_out = engine.run(toks, record=True)
        ablated = abl.outputs if abl.outputs is not None else [torch.zeros_like(o) for o in clean_out]
        deltas = [(ab.expand_as(c) - c).float() for ab, c in zip(ablated, clean_out)]  # noising direction
        grads = [torch.zeros(b_ - a_, *toks.shape, engine.D, device=dev) for a_, b_ in engine.dst_blocks]

        def backward(**kw):
            nonlocal n_backward
            logits, probes = _probed_forward(engine, toks, last, **kw)
            metric = ev.metric(logits, _on(part, dev), clean_logits).sum()
            for g, p in zip(grads, torch.autograd.grad(metric, probes, allow_unused=True)):
                if p is not None:  # None: the probe feeds a block whose output was overridden
                    g += p
            n_backward += 1
            bar.update(1)

        if method == "eap":
            backward()
        elif method == "eap-ig":
            clean_emb, abl_emb = clean_out[0][0], ablated[0][0].expand_as(clean_out[0][0])
            for alpha in alphas:
                backward(emb=abl_emb + alpha * (clean_emb - abl_emb))
        else:
            summed = _block_outputs(engine, clean_out, ablated)
            for block, (c, z) in enumerate(summed):
                for alpha in alphas:
                    backward(override={block: z + alpha * (c - z)})
        n_avg = n_points if method != "eap-ig-activations" else n_points * len(engine.src_blocks)
        _accumulate(engine, scores, deltas, [g / n_avg for g in grads])
    bar.close()
    scores = ev.reduce(scores) / len(ev.data)
    n_backward = int(ev.reduce(torch.tensor([n_backward], dtype=torch.float64)).item())
    meta = {"steps": n_points, "metric": ev.metric_name, "ablation": ev.ablation_kind, "n_backward": n_backward,
            "n_examples": len(ev.data)}
    if method != "eap":
        meta["ig_points"] = ig_points
    return EdgeScores(G, scores, method, meta)


def _block_outputs(engine, clean_out, ablated):
    """(clean, ablated) output of each source block as the forward adds it to the residual."""
    out = []
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

