"""Edge attribution patching: EAP (Syed et al.) and EAP-IG (Hanna et al. 2024), inputs and activations.

An edge's score is ``(ablated_s - clean_s) . dM/dx_d`` summed over positions and averaged over
examples, where ``x_d`` is the destination's own input (each head's q, k and v input separately).
The gradients come from the ordinary shared forward: a head port's input gradient is the
gradient of its own projection pulled back through the port's input norm (a closed-form
vector-Jacobian product), and hooks gather each layer's destinations as the backward reaches them
and fold them into the scores a chunk of tokens at a time, so neither per-port copies of the
residual nor a layer's full gradients are ever held.  The later layers' heads' noising deltas are
rebuilt when folded rather than kept (``keep_deltas``).  EAP-IG averages
the gradients over ``steps`` points between the ablated and the clean run; :func:`ig_alphas` says
where (ours by default, or the EAP-IG repository's).  By position, the same products are summed per
span of tokens (each named position, and the rest) instead of over all of them.

Scores are summed in float64 (each destination's products in fp32) whatever the model's dtype,
and over ranks under ``torch.distributed`` (each rank attributes its share of the examples).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.discovery.edge_scores import EdgeScores, spans_of

KEEP_DELTAS = 0.5  # see attribute(); measured in benchmarks/bench_memory.py
FOLD_CHUNK_BYTES = 32 << 20  # a CPU folds a layer's gradients this many bytes at a time (measured: 8 MiB 1.2x, 64 MiB 1.1x slower)


class _Deltas:
    """The noising deltas ``ablated - clean`` of every source, ``[B*P*D]`` float32 each.

    The input, every MLP and the heads of layers below ``keep_below`` are kept as rows; the heads
    of later layers keep only their clean per-head values ``z`` (a 1/H-sized slice of a row each,
    already held by the forward for its backward) and are recomputed whenever a destination block
    folds them.  The backward starts with every delta alive, so this bounds the attribution's peak;
    the cost is one output projection per (folding layer, recomputed layer) pair.
    """

    def __init__(self, engine, shape: torch.Size, device, ablated: list | None, keep_below: int):
        self.e, self.ablated, self.keep_below = engine, ablated, keep_below
        self.rows = torch.empty(sum(self._rows_per_block()), shape.numel(), dtype=torch.float32, device=device)
        self.B, self.P = shape[0], shape[1]
        self.z: dict[int, tuple] = {}  # recomputed head layers: (z, inv) of the clean run
        self.block, self.row = 0, 0
        self.at: list[tuple[int, int] | None] = []  # per source block: (first row, n rows), or None when recomputed

    def _rows_per_block(self):
        yield 1
        for layer in range(len(self.e.w.layers)):
            yield self.e.H if layer < self.keep_below else 0
            yield 1

    @staticmethod
    def _delta_into(d: torch.Tensor, abl: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """``d = abl - out`` (``abl`` None: zero ablation), computed in ``d``'s dtype."""
        return d.copy_(out).neg_() if abl is None else d.copy_(abl.expand_as(out)).sub_(out)

    @torch.no_grad()
    def __call__(self, out: torch.Tensor):
        """The next source block's clean output ``[k, B, P, D]`` (the input or an MLP)."""
        k = out.shape[0]
        self._delta_into(self.rows[self.row:self.row + k].view(out.shape), None if self.ablated is None else self.ablated[self.block], out)
        self.at.append((self.row, k))
        self.block, self.row = self.block + 1, self.row + k

    @torch.no_grad()
    def heads(self, kernel, layer: int, z: torch.Tensor, inv):
        """A layer's clean per-head values; its deltas are kept or left to recompute."""
        z, inv = z.detach(), None if inv is None else inv.detach()
        if layer < self.keep_below:
            return self(kernel.head_outputs(layer, z, torch.arange(self.e.H), inv))
        self.z[layer] = (z, inv)
        self.at.append(None)
        self.block += 1

    def pieces(self, cuts: list[int]) -> list[tuple[int, int, int | None, int]]:
        """``(first source, n sources, first row or None, block)`` covering sources ``0..max(cuts)-1``
        in order; stored rows are merged into as few pieces as they allow without crossing a cut,
        a recomputed layer's heads are one piece (row None)."""
        out, src, block, end = [], 0, 0, max(cuts)
        while src < end:
            at = self.at[block]
            if at is None:
                out.append((src, self.e.H, None, block))
                src, block = src + self.e.H, block + 1
                continue
            first, k = at
            while block + 1 < len(self.at) and self.at[block + 1] is not None and src + k not in cuts:
                block += 1
                k += self.at[block][1]
            out.append((src, k, first, block))
            src, block = src + k, block + 1
        return out

    def values(self, piece, sl: tuple[slice, slice]) -> torch.Tensor:
        """A piece's deltas at examples and positions ``sl`` (several whole examples, or positions of
        one), ``[k, tokens * D]`` float32, recomputed from the heads' values where not kept."""
        src, k, first, block = piece
        b, p = sl
        if first is not None:
            return self.rows[first:first + k].view(k, self.B, self.P, -1)[:, b, p].reshape(k, -1)
        layer = (block - 1) // 2
        z, inv = self.z[layer]
        out = self.e.kernel.head_outputs(layer, z[b, :, p], torch.arange(self.e.H), None if inv is None else inv[b, p])
        abl = None if self.ablated is None else self.ablated[block]
        if abl is not None:
            abl = abl[:, b if abl.shape[1] != 1 else slice(None), p if abl.shape[2] != 1 else slice(None)]
        if out.dtype == torch.float32 and out.device == self.rows.device:  # in place: ablated - clean
            d = out.neg_() if abl is None else out.neg_().add_(abl)
        else:
            d = self._delta_into(torch.empty(out.shape, dtype=torch.float32, device=self.rows.device), abl, out)
        return d.view(k, -1)


class _ScoreFolder:
    """Folds destinations' input gradients into the edge scores as the backward produces them: the
    gradients of one layer's destinations (its head ports and MLP, and the logits with the last
    layer) are gathered and folded together, so each stored delta is read and each recomputed one
    built once per layer, and no layer's gradients outlive their fold."""

    def __init__(self, engine, scores: torch.Tensor, deltas: _Deltas, span: torch.Tensor | None = None):
        self.e, self.scores, self.deltas = engine, scores, deltas
        self.span = span  # by position: each token's span [B, P] (the last span: every other token)
        self.span_chunks: dict[int, list] = {}
        self.weight = 1.0
        self.pending: list[tuple[int, list, object]] = []  # (first destination, columns, gradient or a thunk)
        self.group: int | None = None

    def _queue(self, layer: int, first_dest: int, cols, grads):
        if self.group is not None and layer != self.group:
            self.flush()
        self.group = layer
        self.pending.append((first_dest, cols, grads))

    def flush(self):
        """Fold the gathered gradients: each source piece times every gathered destination it is
        upstream of, a chunk of tokens at a time (the gradients are made per chunk, never whole)."""
        if not self.pending:
            return
        pending = sorted(self.pending, key=lambda item: -int(self.e.graph.n_upstream[item[0]]))  # most upstream first
        self.pending, self.group = [], None
        n_up = torch.tensor([int(self.e.graph.n_upstream[first]) for first, cols, _ in pending for _ in cols])
        cols = torch.tensor([c for _, cs, _ in pending for c in cs])
        d = self.deltas
        pieces = d.pieces(sorted(set(n_up.tolist())))
        n_sel = [int((n_up >= src + k).sum()) for src, k, _, _ in pieces]  # columns are sorted: the selected ones lead
        acc = [torch.zeros(k, n, dtype=torch.float64, device=d.rows.device) for (_, k, _, _), n in zip(pieces, n_sel)]
        D = d.rows.shape[1] // (d.B * d.P)
        budget = FOLD_CHUNK_BYTES if d.rows.device.type == "cpu" else 16 * FOLD_CHUNK_BYTES
        tokens = max(1, budget // (len(cols) * D * 4))
        U = torch.empty(len(cols) * min(tokens, d.B * d.P) * D, dtype=torch.float32, device=d.rows.device)
        spans = self.span is not None
        if spans:  # per span but the last: [span, source, destination]
            named = [torch.zeros(self.scores.shape[2] - 1, k, n, dtype=torch.float64, device=d.rows.device)
                     for (_, k, _, _), n in zip(pieces, n_sel)]
        for c, (b, p) in enumerate(_token_chunks(d.B, d.P, tokens)):
            n_tok = (b.stop - b.start) * (p.stop - p.start)
            Uc = U[:len(cols) * n_tok * D].view(len(cols), -1)
            at = 0
            for _, cs, grad in pending:  # each destination's gradient at these tokens, straight into its rows
                Uc[at:at + len(cs)].view(len(cs), b.stop - b.start, p.stop - p.start, D).copy_(grad((b, p)))
                at += len(cs)
            if spans:  # the named spans' tokens are taken out, so the full product below is the last span's
                idx, counts = self._span_chunks(tokens)[c]
                Un = Uc.view(len(cols), n_tok, D)[:, idx]
                Uc.view(len(cols), n_tok, D)[:, idx] = 0
            for j, (piece, n, a) in enumerate(zip(pieces, n_sel, acc)):
                if n:
                    v = d.values(piece, (b, p))
                    a += (v @ Uc[:n].T).double()
                    if spans and len(idx):
                        vn, first = v.reshape(len(v), n_tok, D)[:, idx], 0
                        for s, m in enumerate(counts):
                            if m:
                                named[j][s] += (vn[:, first:first + m].reshape(len(v), -1)
                                                @ Un[:n, first:first + m].reshape(n, -1).T).double()
                            first += m
        for j, ((src, k, _, _), n, a) in enumerate(zip(pieces, n_sel, acc)):
            if n:
                if spans:
                    a = torch.cat([named[j].permute(1, 2, 0), a[..., None]], -1)
                self.scores[src:src + k, cols[:n]] += a.cpu() * self.weight

    def _span_chunks(self, tokens: int) -> list[tuple[torch.Tensor, list[int]]]:
        """Per token chunk: its tokens of the named spans grouped by span (on the device), and how many
        each span has; made once per chunk size, so the fold never waits for the device."""
        if tokens not in self.span_chunks:
            d, out = self.deltas, []
            for b, p in _token_chunks(d.B, d.P, tokens):
                sp = self.span[b, p].reshape(-1)
                counts = torch.bincount(sp, minlength=self.scores.shape[2]).tolist()
                idx = torch.argsort(sp, stable=True)[:sum(counts[:-1])]
                out.append((idx.to(d.rows.device), counts[:-1]))
            self.span_chunks[tokens] = out
        return self.span_chunks[tokens]

    def watch_heads(self, layer: int, x: torch.Tensor):
        G, H = self.e.graph, self.e.H
        base = G.head_dest(layer, 0, "q")

        def port_grads(kind, g, pre, sl):
            b, p = sl
            pre = None if pre is None else tuple(t.detach()[b, p] for t in pre)
            return self.e.kernel.port_input_grads(layer, kind, g[b, :, p], x.detach()[b, p], pre)

        def watch(q, k, v, pre):
            for kind, t in enumerate((q, k, v)):
                if t.requires_grad:
                    cols = (base + 3 * torch.arange(H) + kind).tolist()
                    t.register_hook(lambda g, kind=kind, cols=cols: self._queue(
                        layer, base, cols, lambda sl, g=g, kind=kind: port_grads(kind, g, pre, sl)))
        return watch

    def watch(self, t: torch.Tensor, dest: int, layer: int) -> torch.Tensor:
        """``t`` as a destination's input: a view whose gradient is folded into column ``dest``."""
        t = t.view_as(t)
        if t.requires_grad:
            t.register_hook(lambda g: self._queue(layer, dest, [dest], lambda sl, g=g: g[sl[0], sl[1]][None]))
        return t


def _token_chunks(B: int, P: int, tokens: int):
    """``(example slice, position slice)`` covering a ``[B, P]`` batch about ``tokens`` at a time:
    whole examples together, or one example's positions in runs."""
    if tokens >= P:
        step = tokens // P
        for b0 in range(0, B, step):
            yield slice(b0, min(b0 + step, B)), slice(0, P)
    else:
        for b0 in range(B):
            for p0 in range(0, P, tokens):
                yield slice(b0, b0 + 1), slice(p0, min(p0 + tokens, P))


def _lean_forward(engine, tokens, positions, fold: _ScoreFolder, emb=None, override: dict[int, torch.Tensor] | None = None,
                  fill: _Deltas | None = None):
    """Logits at ``positions`` from the ordinary shared forward, with ``fold`` hooked on every
    destination input.  ``override[block]`` replaces a source block's output (the embedding, a layer's
    summed attention output incl. bias, or an MLP output) with a constant, for IG over activations.
    With ``fill`` (EAP: this forward is the clean run) it also records the noising deltas as each
    source block is computed, so no separate clean run is needed.
    Returns ``(logits, leaf)``: differentiate the metric with respect to ``leaf`` to run the hooks."""
    k, G = engine.kernel, engine.graph
    override = override or {}
    emb = override.get(0, engine.w.embed(tokens) if emb is None else emb)
    leaf = emb.detach().requires_grad_(True)
    rope = k.rotary(tokens.shape[1], leaf)
    resid = leaf
    if fill:
        fill(leaf.detach()[None])
    last = len(engine.w.layers) - 1
    for layer in range(last + 1):
        qkv = k.shared_qkv(layer, resid, watch=fold.watch_heads(layer, resid))
        mlp_dest = G.mlp_dest(layer)
        on_attn = None if fill is None else (lambda z, inv, layer=layer: fill.heads(k, layer, z, inv))
        out = k.block(layer, resid, rope[layer], qkv=qkv, mlp_input=lambda mid, d=mlp_dest, layer=layer: fold.watch(mid, d, layer),
                      attn_override=override.get(1 + 2 * layer), mlp_override=override.get(2 + 2 * layer), on_attn=on_attn)
        if fill:
            fill(out.mlp.detach()[None])
        resid = out.resid
    return k.unembed(fold.watch(resid, G.logits_dest, last), positions), leaf


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
              ig_points: str = "right", keep_deltas: float = KEEP_DELTAS, by_position: bool = False) -> EdgeScores:
    """Score every edge with ``eap``, ``eap-ig`` (IG over the input embeddings) or
    ``eap-ig-activations`` (IG over each source block's output, one block at a time, as in MIB);
    ``ig_points`` picks the IG step points (see :func:`ig_alphas`).  ``keep_deltas`` is the fraction
    of layers, from the first, whose heads' noising deltas stay in memory; the others are recomputed
    when folded (1: fastest, 0: leanest; the scores are the same).  IG over activations keeps all.

    ``by_position``: one score per edge and span -- each position the dataset names, and ``rest`` (every
    other token) -- the same products summed per span instead of over all tokens (:func:`spans_of`)."""
    if not 0 <= keep_deltas <= 1:
        raise ValueError(f"keep_deltas must be between 0 and 1, got {keep_deltas}")
    if method not in ("eap", "eap-ig", "eap-ig-activations"):
        raise ValueError(f"unknown attribution method '{method}'; expected eap, eap-ig or eap-ig-activations")
    alphas = ig_alphas(steps, ig_points)
    ev, engine = evaluator, evaluator.engine
    keep_below = math.ceil(keep_deltas * len(engine.w.layers))
    G = engine.graph
    spans = spans_of(ev.data) if by_position else None
    scores = torch.zeros(len(G.sources), len(G.destinations), *([len(spans)] if spans else []), dtype=torch.float64)
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
        shape = torch.Size((*toks.shape, engine.D))
        span = part.span_index(spans[:-1]) if spans else None
        if method == "eap":  # the attribution forward is the clean run: it fills the deltas itself
            fill = deltas = _Deltas(engine, shape, dev, ablated, keep_below)
            fold = _ScoreFolder(engine, scores, deltas, span)
        elif method == "eap-ig":  # the IG points are not the clean run: a clean forward without gradients fills them
            deltas = _Deltas(engine, shape, dev, ablated, keep_below)
            fold = _ScoreFolder(engine, scores, deltas, span)
            with torch.no_grad():
                _lean_forward(engine, toks, last, fold, fill=deltas)
                clean_emb = engine.w.embed(toks)
            abl_emb = torch.zeros_like(clean_emb) if ablated is None else ablated[0][0].expand_as(clean_emb)
        else:
            with torch.no_grad():
                _, clean_out = engine.run(toks, record=True)
                summed = _block_outputs(engine, clean_out, ablated)
                deltas = _Deltas(engine, shape, dev, ablated, len(engine.w.layers))
                for b in range(len(clean_out)):  # released block by block, so the two are never held twice
                    out, clean_out[b] = clean_out[b], None
                    deltas(out)
            fold = _ScoreFolder(engine, scores, deltas, span)
        n_avg = n_points if method != "eap-ig-activations" else n_points * len(engine.src_blocks)
        fold.weight = 1.0 / n_avg

        def backward(fold=fold, **kw):
            nonlocal n_backward
            logits, leaf = _lean_forward(engine, toks, last, fold, **kw)
            metric = ev.metric(logits, part.to(dev), clean_logits).sum()
            torch.autograd.grad(metric, leaf, allow_unused=True)  # the hooks fold the gradients into the scores
            fold.flush()
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
    return EdgeScores(G, scores, method, meta, spans=spans)


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

