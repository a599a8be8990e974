"""Edge attribution patching: EAP (Syed et al.) and EAP-IG (Hanna et al. 2024), inputs and activations.

An edge's score is ``(ablated_s - clean_s) . dM/dx_d`` summed over positions and averaged over
examples, where ``x_d`` is the destination's own input (each head's q, k and v input separately).
The gradients come from one differentiable forward in which every destination reads the shared
residual plus a zero "probe" tensor of its own; the probes' gradients are the per-destination
input gradients.  EAP-IG averages the gradients over ``steps`` points between the ablated and
the clean run (right Riemann sum, so ``steps=1`` is exactly EAP).
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


def attribute(evaluator: Evaluator, method: str = "eap", steps: int = 5, progress: bool = True) -> EdgeScores:
    """Score every edge with ``eap``, ``eap-ig`` (IG over the input embeddings) or
    ``eap-ig-activations`` (IG over each source block's output, one block at a time, as in MIB)."""
    if method not in ("eap", "eap-ig", "eap-ig-activations"):
        raise ValueError(f"unknown attribution method '{method}'; expected eap, eap-ig or eap-ig-activations")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ev, engine = evaluator, evaluator.engine
    G = engine.graph
    scores = torch.zeros(len(G.sources), len(G.destinations), dtype=torch.float64)
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
            for k in range(1, steps + 1):
                backward(emb=abl_emb + (k / steps) * (clean_emb - abl_emb))
        else:
            summed = _block_outputs(engine, clean_out, ablated)
            for block, (c, z) in enumerate(summed):
                for k in range(1, steps + 1):
                    backward(override={block: z + (k / steps) * (c - z)})
        n_avg = n_points if method != "eap-ig-activations" else n_points * len(engine.src_blocks)
        _accumulate(engine, scores, deltas, [g / n_avg for g in grads])
    bar.close()
    scores /= len(ev.data)
    return EdgeScores(G, scores, method, {"steps": n_points, "metric": ev.metric_name, "ablation": ev.ablation_kind,
                                          "n_backward": n_backward, "n_examples": len(ev.data)})


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

