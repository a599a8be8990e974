"""Exact edge patching in one forward pass.

Every destination input (a head's q, k or v input, an MLP input, the final residual) is the sum of
its sources' outputs plus constant biases.  With ``delta_s = patched_s - ablated_s`` this is

    x_d = A_d + sum_{s in circuit} delta_s = R_d - sum_{s not in circuit} delta_s,

where ``A_d`` is the all-ablated residual and ``R_d`` the patched run's own residual.  The engine
picks, per destination, whichever sum has fewer terms, and skips whole source blocks (a layer's
heads, an MLP) whose coefficients are all zero, so a circuit costs work proportional to the
smaller of itself and its complement.  Several circuits share one pass by stacking them on the
batch axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .architectures import Weights
from .graph import Graph


@dataclass
class SourceBlock:
    """A run of consecutive sources computed together: ``input``, one layer's heads, or one MLP."""

    start: int
    stop: int


@dataclass
class Ablation:
    """What a source outputs when its edge is not in the circuit.

    ``outputs[b]`` is ``[k_b, B', P', D]`` per source block (``B'`` is the batch size or 1, ``P'``
    the length or 1), or ``None`` for zero ablation; ``resid`` holds the all-ablated residual at
    each destination block, biases included.
    """

    outputs: list[torch.Tensor] | None
    resid: list[torch.Tensor]
    kind: str = "corrupted"


@dataclass
class BlockPlan:
    """How to build one destination block's inputs for a set of circuits."""

    terms: list[tuple[int, torch.Tensor]]  # (source block, coefficients)
    use_patched: torch.Tensor | None  # [C, n] bool; None when positional (base is always ablated)
    positional: bool
    shared: str | None = None  # "patched" / "ablated" when every destination reads the same tensor


@dataclass
class Plan:
    """A compiled set of ``C`` circuits for one batch."""

    n_circuits: int
    blocks: list[BlockPlan] = field(default_factory=list)


class PatchEngine:
    """Runs a model in the canonical per-head form, plainly or with edges patched."""

    def __init__(self, weights: Weights, graph: Graph):
        self.w = weights
        self.graph = graph
        info = weights.info
        self.H, self.D, self.dh = info.n_heads, info.d_model, info.d_head
        self.src_blocks = [SourceBlock(0, 1)]
        self.dst_blocks: list[tuple[int, int]] = []  # (start, stop) of destination indices
        for layer in range(info.n_layers):
            hs = graph.head_source(layer, 0)
            self.src_blocks += [SourceBlock(hs, hs + self.H), SourceBlock(hs + self.H, hs + self.H + 1)]
            hd = graph.head_dest(layer, 0, "q")
            self.dst_blocks += [(hd, hd + 3 * self.H), (hd + 3 * self.H, hd + 3 * self.H + 1)]
        self.dst_blocks.append((graph.logits_dest, graph.logits_dest + 1))
        self._flat_qkv = [l.W_QKV.permute(2, 0, 1, 3).reshape(self.D, -1).contiguous() for l in weights.layers]
        self._flat_bqkv = [None if l.b_QKV is None else l.b_QKV.reshape(-1) for l in weights.layers]
        # destination order within a layer is head-major (h0<q>, h0<k>, h0<v>, h1<q>, ...)
        self._head_qkv = [l.W_QKV.transpose(0, 1).reshape(3 * self.H, self.D, self.dh).contiguous() for l in weights.layers]
        self._head_bqkv = [None if l.b_QKV is None else l.b_QKV.transpose(0, 1).reshape(3 * self.H, 1, self.dh) for l in weights.layers]

    # ----- building blocks --------------------------------------------------------------
    def _n_upstream_blocks(self, dst_block: int) -> int:
        """How many source blocks a destination block reads (a prefix of ``src_blocks``)."""
        start = self.dst_blocks[dst_block][0]
        n_up = int(self.graph.n_upstream[start])
        return next(i for i, b in enumerate(self.src_blocks + [SourceBlock(n_up, n_up)]) if b.start >= n_up)

    def _attention(self, layer: int, x: torch.Tensor, cos_sin, shared: bool) -> torch.Tensor:
        """Per-head outputs ``[H, B, P, D]`` from inputs ``[3H, B, P, D]`` (or one shared ``[B, P, D]``)."""
        lw = self.w.layers[layer]
        H, dh = self.H, self.dh
        if shared:
            B, P, _ = x.shape
            h = lw.ln1(x).reshape(B * P, -1) @ self._flat_qkv[layer]
            if self._flat_bqkv[layer] is not None:
                h = h + self._flat_bqkv[layer]
            qkv = h.view(B, P, 3, H, dh).permute(2, 0, 3, 1, 4)  # [3, B, H, P, dh]
        else:
            _, B, P, D = x.shape
            normed = lw.ln1(x).view(3 * H, B * P, D)
            h = torch.bmm(normed, self._head_qkv[layer])
            if self._head_bqkv[layer] is not None:
                h = h + self._head_bqkv[layer]
            qkv = h.view(H, 3, B, P, dh).permute(1, 2, 0, 3, 4)  # inputs are ordered head-major, port-minor
        q, k, v = qkv[0], qkv[1], qkv[2]
        if lw.q_norm is not None:
            q, k = lw.q_norm(q), lw.k_norm(k)
        if cos_sin is not None:
            q, k = _rotate(q, cos_sin), _rotate(k, cos_sin)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=lw.attn_scale)  # [B, H, P, dh]
        B, _, P, _ = z.shape
        out = torch.bmm(z.transpose(0, 1).reshape(H, B * P, dh), lw.W_O)
        return out.view(H, B, P, self.D)

    # ----- plain forward ----------------------------------------------------------------
    def run(self, tokens: torch.Tensor, record: bool = False, logit_positions: torch.Tensor | None = None):
        """Plain forward.  Returns ``(logits, outputs)``; ``outputs`` (per source block) when ``record``."""
        outputs = []
        resid = self.w.embed(tokens)
        cos_sin = self.w.rotary(torch.arange(tokens.shape[1], device=tokens.device), resid.dtype)
        if record:
            outputs.append(resid[None])
        for layer, lw in enumerate(self.w.layers):
            heads = self._attention(layer, resid, cos_sin, shared=True)
            attn = heads.sum(0) if lw.b_O is None else heads.sum(0) + lw.b_O
            mlp_in = resid if self.w.info.parallel_attn_mlp else resid + attn
            mlp = lw.mlp(lw.ln2(mlp_in))
            resid = resid + attn + mlp
            if record:
                outputs += [heads, mlp[None]]
        return self._unembed(resid, logit_positions), (outputs if record else None)

    def _unembed(self, resid, logit_positions):
        if logit_positions is not None:
            resid = resid[torch.arange(resid.shape[0], device=resid.device), logit_positions]
        return self.w.unembed(resid)

    # ----- ablations ---------------------------------------------------------------------
    def make_ablation(self, outputs: list[torch.Tensor] | None, kind: str, like: torch.Tensor | None = None) -> Ablation:
        """Cumulate ablated source outputs (plus biases) into the residual each destination block reads."""
        parallel = self.w.info.parallel_attn_mlp
        if outputs is None:
            zero = torch.zeros(1, 1, self.D, dtype=self.w.W_U.dtype, device=self.w.W_U.device)
            blocks = [None] * len(self.src_blocks)
            cur = zero
        else:
            blocks = outputs
            cur = outputs[0][0]
        resid = []
        for layer, lw in enumerate(self.w.layers):
            resid.append(cur)  # heads of this layer
            heads = blocks[1 + 2 * layer]
            after_attn = cur + (heads.sum(0) if heads is not None else 0) + (lw.b_O if lw.b_O is not None else 0)
            resid.append(cur if parallel else after_attn)
            mlp = blocks[2 + 2 * layer]
            cur = after_attn + (mlp[0] if mlp is not None else 0)
        resid.append(cur)
        return Ablation(outputs, resid, kind)

    # ----- plans -------------------------------------------------------------------------
    def compile(self, masks: torch.Tensor, position_masks: dict[tuple[int, int], torch.Tensor] | None = None,
                batch: int | None = None, length: int | None = None) -> Plan:
        """Compile circuits into a :class:`Plan`.

        ``masks`` is bool ``[C, n_sources, n_destinations]``; ``position_masks`` maps an edge
        ``(source, destination)`` to a bool ``[B, P]`` telling at which positions it is in the
        circuit (one circuit only).
        """
        masks = masks.to(torch.bool) & self.graph.legal.to(masks.device)
        C = masks.shape[0]
        plan = Plan(C)
        pos_by_dst: dict[int, list] = {}
        if position_masks:
            if C != 1:
                raise ValueError("position-restricted circuits are evaluated one at a time")
            for (s, d), pm in position_masks.items():
                pos_by_dst.setdefault(d, []).append((s, pm))
        for bi, (d0, d1) in enumerate(self.dst_blocks):
            n_blocks = self._n_upstream_blocks(bi)
            m = masks[:, :, d0:d1].float()  # [C, S, n]
            positional = any(d0 <= d < d1 for d in pos_by_dst)
            terms = []
            if positional:
                full = m[0][:, :, None, None].expand(-1, -1, batch, length).clone()
                for d in range(d0, d1):
                    for s, pm in pos_by_dst.get(d, []):
                        full[s, d - d0] = pm.to(full.dtype)
                for b in range(n_blocks):
                    sb = self.src_blocks[b]
                    coef = full[sb.start:sb.stop]
                    if coef.any():
                        terms.append((b, coef))
                plan.blocks.append(BlockPlan(terms, None, True))
                continue
            n_up = int(self.graph.n_upstream[d0])
            n_in = m[:, :n_up].sum(1)  # [C, n] (all destinations of a block share n_up)
            use_patched = n_in > n_up / 2
            coef = torch.where(use_patched[:, None, :], m - 1.0, m)  # +1: add delta to A; -1: subtract from R
            for b in range(n_blocks):
                sb = self.src_blocks[b]
                c = coef[:, sb.start:sb.stop]
                if c.any():
                    terms.append((b, c))
            shared = None
            if not terms:
                if bool(use_patched.all()):
                    shared = "patched"
                elif not bool(use_patched.any()):
                    shared = "ablated"
            plan.blocks.append(BlockPlan(terms, use_patched, False, shared))
        return plan

    # ----- patched forward ---------------------------------------------------------------
    def patched_run(self, tokens: torch.Tensor, ablation: Ablation, plan: Plan,
                    logit_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the clean ``tokens`` with every edge outside the plan's circuits ablated.

        Returns ``[C, B, vocab]`` (at ``logit_positions``) or ``[C, B, P, vocab]``.
        """
        C = plan.n_circuits
        B, P = tokens.shape
        Bt = C * B
        toks = tokens.repeat(C, 1) if C > 1 else tokens
        emb = self.w.embed(toks)
        cos_sin = self.w.rotary(torch.arange(P, device=tokens.device), emb.dtype)
        deltas: list[torch.Tensor] = []  # per source block, [k, Bt, P, D]

        def tile(t):  # ablation tensors are [.., B' , P', D] with B' in {1, B}
            if t.shape[-3] == 1 or C == 1:
                return t
            return t.repeat(*([1] * (t.dim() - 3)), C, 1, 1)

        def delta(block: int, out: torch.Tensor) -> torch.Tensor:
            if ablation.outputs is None:
                return out
            return out - tile(ablation.outputs[block])

        def inputs(bi: int, resid: torch.Tensor) -> tuple[torch.Tensor, bool]:
            bp = plan.blocks[bi]
            A = tile(ablation.resid[bi]).expand(Bt, P, self.D)
            if bp.shared == "patched":
                return resid, True
            if bp.shared == "ablated":
                return A, True
            n = self.dst_blocks[bi][1] - self.dst_blocks[bi][0]
            if bp.positional:
                x = A.expand(n, Bt, P, self.D)
                for b, coef in bp.terms:  # coef [k, n, B, P]
                    x = x + torch.einsum("kbpd,knbp->nbpd", deltas[b], coef)
                return x, False
            up = bp.use_patched.T.float()  # [n, C]
            up = up.repeat_interleave(B, dim=1)[:, :, None, None]  # [n, Bt, 1, 1]
            x = A + up * (resid - A)
            for b, coef in bp.terms:  # coef [C, k, n]
                d = deltas[b]
                k = d.shape[0]
                if C == 1:
                    mix = (coef[0].T @ d.reshape(k, -1)).view(n, Bt, P, self.D)
                else:
                    mix = torch.einsum("kcx,ckn->ncx", d.view(k, C, -1), coef).reshape(n, Bt, P, self.D)
                x = x + mix
            return x, False

        resid = emb
        deltas.append(delta(0, emb[None]))
        parallel = self.w.info.parallel_attn_mlp
        for layer, lw in enumerate(self.w.layers):
            x, shared = inputs(2 * layer, resid)
            heads = self._attention(layer, x, cos_sin, shared)
            deltas.append(delta(1 + 2 * layer, heads))
            attn = heads.sum(0) if lw.b_O is None else heads.sum(0) + lw.b_O
            x, shared = inputs(2 * layer + 1, resid if parallel else resid + attn)
            mlp = lw.mlp(lw.ln2(x if shared else x[0]))
            deltas.append(delta(2 + 2 * layer, mlp[None]))
            resid = resid + attn + mlp
        x, shared = inputs(len(self.dst_blocks) - 1, resid)
        final = x if shared else x[0]
        logits = self._unembed(final, logit_positions.repeat(C) if logit_positions is not None and C > 1 else logit_positions)
        return logits.view(C, B, *logits.shape[1:])


def _rotate(x: torch.Tensor, cos_sin) -> torch.Tensor:
    """Rotary embedding on the first ``rotary_dim`` features (GPT-NeoX and Llama convention)."""
    cos, sin = cos_sin
    rd = cos.shape[-1]
    rot, keep = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, keep), dim=-1) if keep.shape[-1] else out
