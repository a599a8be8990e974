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
from functools import cached_property

import torch
import torch.nn.functional as F

from circuitgraph.model.architectures import Weights
from circuitgraph.graph.computational_graph import Graph


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
    """How one destination block (a layer's 3H head ports, an MLP, the logits) gets its inputs.

    Destinations split three ways: those reading the all-ablated residual ``A`` unchanged in every
    circuit (``from_ablated``), those reading the patched residual ``R`` unchanged (``from_patched``),
    and the rest (``custom``), built as ``A + up * (R - A) + coef . deltas[rows]``.
    """

    from_ablated: torch.Tensor  # local destination indices
    from_patched: torch.Tensor
    custom: torch.Tensor
    prefix: int  # rows of the delta buffer this block may read (all needed rows upstream of it)
    gather: torch.Tensor | None  # buffer rows to gather, or None to read the whole prefix (dense case)
    coef: torch.Tensor | None  # [C, K, n_custom], or [K, n_custom, B, P] when positional
    up: torch.Tensor | None  # [n_custom, C] float: 1 where the base is R
    positional: bool = False


@dataclass
class PrefixState:
    """A patched run paused at the start of ``layer`` (one circuit): what later layers need to resume.

    Changing edges into layer ``layer`` or later cannot change anything before it, so trials that
    differ only there (ACDC) resume from here instead of re-running the model from the embedding.
    """

    layer: int
    resid: torch.Tensor  # [B, P, D] patched residual at the start of the layer
    deltas: list[torch.Tensor]  # per source block before the layer: patched - ablated, all rows

    @cached_property
    def flat(self) -> torch.Tensor:
        """All sources' deltas before the layer, ``[n_sources_before, B, P, D]`` in source order."""
        return torch.cat(self.deltas)


@dataclass
class Plan:
    """A compiled set of ``C`` circuits for one batch shape."""

    n_circuits: int
    blocks: list[BlockPlan] = field(default_factory=list)
    needed: list[torch.Tensor] = field(default_factory=list)  # per source block: local rows whose deltas are used
    offsets: list[int] = field(default_factory=list)  # per source block: its first row in the delta buffer
    n_rows: int = 0
    buffer_sources: torch.Tensor | None = None  # global source index of each buffer row


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
        # destination order within a layer is head-major (h0<q>, h0<k>, h0<v>, h1<q>, ...)
        self._head_qkv = [l.W_QKV.transpose(0, 1).reshape(3 * self.H, self.D, self.dh).contiguous() for l in weights.layers]
        self._head_bqkv = [None if l.b_QKV is None else l.b_QKV.transpose(0, 1).reshape(3 * self.H, 1, self.dh) for l in weights.layers]
        self._dest_flat = [w.permute(1, 0, 2).reshape(self.D, -1).contiguous() for w in self._head_qkv]
        self._dest_flat_b = [None if b is None else b.reshape(-1) for b in self._head_bqkv]
        self._o_flat = [l.W_O.reshape(-1, self.D) for l in weights.layers]

    # ----- building blocks --------------------------------------------------------------
    def _n_upstream_blocks(self, dst_block: int) -> int:
        """How many source blocks a destination block reads (a prefix of ``src_blocks``)."""
        start = self.dst_blocks[dst_block][0]
        n_up = int(self.graph.n_upstream[start])
        return next(i for i, b in enumerate(self.src_blocks + [SourceBlock(n_up, n_up)]) if b.start >= n_up)

    # ----- plain forward ----------------------------------------------------------------
    def run(self, tokens: torch.Tensor, record: bool = False, logit_positions: torch.Tensor | None = None):
        """Plain forward.  Returns ``(logits, outputs)``; ``outputs`` (per source block) when ``record``."""
        outputs = []
        resid = self.w.embed(tokens)
        cos_sin = self.w.rotary(torch.arange(tokens.shape[1], device=tokens.device), resid.dtype)
        if record:
            outputs.append(resid[None])
        all_heads = torch.arange(self.H)
        for layer, lw in enumerate(self.w.layers):
            z = self._attend(layer, self._shared_qkv(layer, resid), cos_sin)
            attn = self._attn_out(layer, z)
            mlp_in = resid if self.w.info.parallel_attn_mlp else resid + attn
            mlp = lw.mlp(lw.ln2(mlp_in))
            resid = resid + attn + mlp
            if record:
                outputs += [self._head_results(layer, z, all_heads), mlp[None]]
        return self._unembed(resid, logit_positions), (outputs if record else None)

    def clean_states(self, outputs: list[torch.Tensor], ablation: Ablation) -> list[PrefixState]:
        """Prefix states of the full circuit (= the plain run that recorded ``outputs``) at every layer."""
        states, resid, deltas = [], outputs[0][0], []
        for block, out in enumerate(outputs):
            abl = ablation.outputs[block] if ablation.outputs is not None else None
            deltas.append(out if abl is None else out - abl)
            if block % 2 == 0:  # after the embedding or an MLP: a layer starts
                if block:
                    lw = self.w.layers[block // 2 - 1]
                    heads = outputs[block - 1].sum(0)
                    resid = resid + (heads if lw.b_O is None else heads + lw.b_O) + out[0]
                states.append(PrefixState(block // 2, resid, list(deltas)))
        return states

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
        circuit (one circuit only; ``masks`` must be False for those edges).
        """
        legal = self.graph.legal.to(masks.device)
        masks = masks.to(torch.bool) & legal
        C = masks.shape[0]
        if position_masks and C != 1:
            raise ValueError("position-restricted circuits are evaluated one at a time")
        pos_by_dst: dict[int, list] = {}
        for (s, d), pm in (position_masks or {}).items():
            pos_by_dst.setdefault(d, []).append((s, pm))
        raw = []  # per destination block: (from_ablated, from_patched, custom, global rows, coef, up, positional)
        needed = [set() for _ in self.src_blocks]
        for d0, d1 in self.dst_blocks:
            n = d1 - d0
            n_up = int(self.graph.n_upstream[d0])
            m = masks[:, :n_up, d0:d1].to(self.w.W_U.dtype)  # [C, S, n]
            positional = any(d0 <= d < d1 for d in pos_by_dst)
            if positional:
                coef_full = m[0][:, :, None, None].expand(-1, -1, batch, length).clone()
                for d in range(d0, d1):
                    for s, pm in pos_by_dst.get(d, []):
                        coef_full[s, d - d0] = pm.to(coef_full.dtype)
                active = coef_full.flatten(2).any(-1)  # [S, n]
                use_r = torch.zeros(C, n, dtype=torch.bool, device=masks.device)
            else:
                use_r = m.sum(1) > n_up / 2  # [C, n]: fewer terms from R than from A
                coef_full = torch.where(use_r[:, None, :], m - 1.0, m)  # +1: add delta to A; -1: take from R
                active = (coef_full != 0).any(0)  # [S, n]
            has_terms = active.any(0)  # [n]
            all_r, all_a = use_r.all(0), (~use_r).all(0)
            from_a = torch.nonzero(~has_terms & all_a).flatten()
            from_r = torch.nonzero(~has_terms & all_r).flatten()
            custom = torch.nonzero(has_terms | ~(all_a | all_r)).flatten()
            rows = torch.nonzero(active[:, custom].any(1)).flatten()
            for r in rows.tolist():
                b = self._block_of(r)
                needed[b].add(r - self.src_blocks[b].start)
            if positional:
                coef = coef_full[rows][:, custom]
            else:
                coef = coef_full[:, rows][:, :, custom]
            raw.append((from_a, from_r, custom, rows, coef, use_r[:, custom].T.to(self.w.W_U.dtype), positional))
        plan = Plan(C, needed=[torch.tensor(sorted(x), dtype=torch.long) for x in needed])
        buffer_row = {}  # global source index -> row of the delta buffer (sources in topological order)
        for b, rows_b in enumerate(plan.needed):
            plan.offsets.append(len(buffer_row))
            for r in rows_b.tolist():
                buffer_row[self.src_blocks[b].start + r] = len(buffer_row)
        plan.n_rows = len(buffer_row)
        plan.buffer_sources = torch.tensor(list(buffer_row), dtype=torch.long, device=masks.device)
        for bi, (from_a, from_r, custom, rows, coef, up, positional) in enumerate(raw):
            if not len(custom):
                plan.blocks.append(BlockPlan(from_a, from_r, custom, 0, None, None, None, positional))
                continue
            n_up = int(self.graph.n_upstream[self.dst_blocks[bi][0]])
            prefix = sum(1 for r in buffer_row if r < n_up)
            pos = torch.tensor([buffer_row[r] for r in rows.tolist()], dtype=torch.long)
            gather = None
            if not len(pos):  # custom only because circuits disagree on the base; nothing to mix
                coef = None
            elif len(pos) < prefix / 2:  # sparse: gather the few rows; dense: read the prefix with zero rows
                gather = pos
            else:
                if positional:
                    full = coef.new_zeros(prefix, *coef.shape[1:])
                    full[pos] = coef
                else:
                    full = coef.new_zeros(coef.shape[0], prefix, coef.shape[2])
                    full[:, pos] = coef
                coef = full
            plan.blocks.append(BlockPlan(from_a, from_r, custom, prefix, gather, coef, up, positional))
        return plan

    def _block_of(self, source: int) -> int:
        if source == 0:
            return 0
        layer, within = divmod(source - 1, self.H + 1)
        return 1 + 2 * layer + (1 if within == self.H else 0)

    # ----- patched forward ---------------------------------------------------------------
    def patched_run(self, tokens: torch.Tensor, ablation: Ablation, plan: Plan,
                    logit_positions: torch.Tensor | None = None, start: PrefixState | None = None,
                    stop_layer: int | None = None):
        """Logits of the clean ``tokens`` with every edge outside the plan's circuits ablated.

        Returns ``[C, B, vocab]`` (at ``logit_positions``) or ``[C, B, P, vocab]``.  With
        ``stop_layer`` it returns the :class:`PrefixState` at that layer instead (one circuit);
        with ``start`` it resumes from such a state (the plan must agree with it before its layer).
        """
        C = plan.n_circuits
        B, P = tokens.shape
        Bt, D = C * B, self.D
        toks = tokens.repeat(C, 1) if C > 1 else tokens
        emb = self.w.embed(toks)
        cos_sin = self.w.rotary(torch.arange(P, device=tokens.device), emb.dtype)
        # patched - ablated outputs of the sources later blocks read, laid out [C, rows, B, P, D] so
        # that one batched matmul per block mixes them (no per-destination copies)
        dbuf = emb.new_empty(C, plan.n_rows, B, P, D)

        def tile(t):  # ablation tensors are [..., B', P', D] with B' in {1, B}
            return t if t.shape[-3] == 1 or C == 1 else t.repeat(*([1] * (t.dim() - 3)), C, 1, 1)

        def store(block: int, out: torch.Tensor):
            """Keep ``patched - ablated`` for the rows later blocks read (``out`` holds just those rows)."""
            rows = plan.needed[block]
            if not len(rows):
                return
            if ablation.outputs is not None:
                abl = ablation.outputs[block]
                out = out - tile(abl if len(rows) == abl.shape[0] else abl[rows.to(out.device)])
            o = plan.offsets[block]
            dbuf[:, o:o + len(rows)] = out.view(len(rows), C, B, P, D).transpose(0, 1)

        def custom_inputs(bp: BlockPlan, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
            """``[n_custom, Bt, P, D]`` inputs of the custom destinations."""
            n = len(bp.custom)
            if bp.up is not None and bool(bp.up.any()):
                up = bp.up.repeat_interleave(B, dim=1)[:, :, None, None]  # [n, Bt, 1, 1]
                x = A + up * (R - A)
            else:
                x = A.expand(n, Bt, P, D)
            if bp.coef is None:
                return x
            if split is not None:
                return x + resumed_mix(bp, n)
            G = dbuf[:, :bp.prefix] if bp.gather is None else dbuf.index_select(1, bp.gather.to(dbuf.device))
            K = G.shape[1]
            if bp.positional:
                mix = torch.einsum("kbpd,knbp->nbpd", G[0], bp.coef)
            elif C == 1:
                mix = (bp.coef[0].T @ G[0].reshape(K, -1)).view(n, Bt, P, D)
            else:
                mix = torch.bmm(bp.coef.transpose(1, 2), G.reshape(C, K, -1))  # [C, n, B*P*D]
                mix = mix.view(C, n, B, P, D).transpose(0, 1).reshape(n, Bt, P, D)
            return x + mix

        def resumed_mix(bp: BlockPlan, n: int) -> torch.Tensor:
            """The mix when rows before ``split`` live in the prefix state (one copy for all circuits)."""
            rows = bp.gather.to(dbuf.device) if bp.gather is not None else torch.arange(bp.prefix, device=dbuf.device)
            coef = bp.coef  # [C, K, n]
            pre = rows < split
            mix = 0
            if bool(pre.any()):
                Gp = start.flat.index_select(0, plan.buffer_sources[rows[pre]].to(dbuf.device))  # [Kp, B, P, D]
                mix = torch.einsum("kx,ckn->cnx", Gp.reshape(Gp.shape[0], -1), coef[:, pre])
            if bool((~pre).any()):
                Gq = dbuf.index_select(1, rows[~pre])  # [C, Kq, B, P, D]
                mix = mix + torch.bmm(coef[:, ~pre].transpose(1, 2), Gq.reshape(C, Gq.shape[1], -1))
            return mix.view(C, n, B, P, D).transpose(0, 1).reshape(n, Bt, P, D)

        split = None

        def single_input(bi: int, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
            """Input of a one-destination block (an MLP or the logits)."""
            bp = plan.blocks[bi]
            if len(bp.from_patched):
                return R
            if len(bp.from_ablated):
                return A
            return custom_inputs(bp, A, R)[0]

        full: list[torch.Tensor] = []  # all-row deltas, kept when pausing

        def keep_full(block: int, out: torch.Tensor):
            abl = ablation.outputs[block] if ablation.outputs is not None else None
            full.append(out if abl is None else out - abl)

        parallel = self.w.info.parallel_attn_mlp
        if start is None:
            resid, first = emb, 0
            store(0, emb[None])
            if stop_layer is not None:
                keep_full(0, emb[None])
        else:
            resid, first = (start.resid.repeat(C, 1, 1) if C > 1 else start.resid), start.layer
            if any(bp.positional for bp in plan.blocks):  # the simple way: copy the state into the buffer
                for block in range(1 + 2 * first):
                    rows = plan.needed[block]
                    if len(rows):
                        o = plan.offsets[block]
                        dbuf[:, o:o + len(rows)] = start.deltas[block][rows.to(dbuf.device)][None]
            else:  # buffer rows below this one are read from the state, shared by every circuit
                split = plan.offsets[1 + 2 * first] if 1 + 2 * first < len(plan.offsets) else plan.n_rows
        last_layer = len(self.w.layers) if stop_layer is None else stop_layer
        for layer in range(first, last_layer):
            lw = self.w.layers[layer]
            A = tile(ablation.resid[2 * layer]).expand(Bt, P, D)
            qkv = self._qkv(layer, plan.blocks[2 * layer], A, resid, custom_inputs)
            heads_z = self._attend(layer, qkv, cos_sin)  # [Bt, H, P, dh]
            attn = self._attn_out(layer, heads_z)
            rows = plan.needed[1 + 2 * layer]
            if stop_layer is not None:
                keep_full(1 + 2 * layer, self._head_results(layer, heads_z, torch.arange(self.H)))
            if len(rows):
                store(1 + 2 * layer, self._head_results(layer, heads_z, rows))
            R_mid = resid if parallel else resid + attn
            A_mid = tile(ablation.resid[2 * layer + 1]).expand(Bt, P, D)
            mlp = lw.mlp(lw.ln2(single_input(2 * layer + 1, A_mid, R_mid)))
            store(2 + 2 * layer, mlp[None])
            if stop_layer is not None:
                keep_full(2 + 2 * layer, mlp[None])
            resid = resid + attn + mlp
        if stop_layer is not None:
            if C != 1:
                raise ValueError("a prefix state holds one circuit")
            return PrefixState(stop_layer, resid, full)
        A = tile(ablation.resid[-1]).expand(Bt, P, D)
        positions = logit_positions.repeat(C) if logit_positions is not None and C > 1 else logit_positions
        bp = plan.blocks[-1]
        if positions is None or bp.positional:
            logits = self._unembed(single_input(len(self.dst_blocks) - 1, A, resid), positions)
            return logits.view(C, B, *logits.shape[1:])
        # only the read positions of the final residual matter: build them alone
        rows_bt = torch.arange(Bt, device=resid.device)
        A_last, R_last = A[rows_bt, positions], resid[rows_bt, positions]  # [Bt, D]
        if len(bp.from_patched) or len(bp.from_ablated) or bp.coef is None:
            final = R_last if len(bp.from_patched) else A_last
            if bp.coef is None and len(bp.custom):
                final = A_last + bp.up.repeat_interleave(B, dim=1)[0, :, None] * (R_last - A_last)
        else:
            up = bp.up.repeat_interleave(B, dim=1)[0, :, None]  # [Bt, 1]
            final = A_last + up * (R_last - A_last)
            rows = bp.gather.to(resid.device) if bp.gather is not None else torch.arange(bp.prefix, device=resid.device)
            pos_b, b_idx = logit_positions, torch.arange(B, device=resid.device)
            coef = bp.coef[:, :, 0]  # [C, K]
            lim = split if split is not None else plan.n_rows
            pre, post = rows < lim, rows >= lim
            mix = 0
            if split is not None and bool(pre.any()):
                src = plan.buffer_sources[rows[pre]].to(resid.device)
                G = start.flat[src[:, None], b_idx[None], pos_b[None]]  # [Kp, B, D]
                mix = torch.einsum("kbd,ck->cbd", G, coef[:, pre])
            sel = post if split is not None else torch.ones_like(post)
            if bool(sel.any()):
                G = dbuf[:, rows[sel]][:, :, b_idx, pos_b]  # [C, K, B, D]
                mix = mix + torch.einsum("ckbd,ck->cbd", G, coef[:, sel])
            final = final + mix.reshape(Bt, D) if torch.is_tensor(mix) else final
        return self.w.unembed(final).view(C, B, -1)

    def _qkv(self, layer: int, bp: BlockPlan, A, R, custom_inputs) -> torch.Tensor:
        """Queries, keys and values ``[3, Bt, H, P, dh]`` of one layer under a plan."""
        lw = self.w.layers[layer]
        H, dh, D = self.H, self.dh, self.D
        Bt, P, _ = R.shape
        n = 3 * H
        if len(bp.from_ablated) == n or len(bp.from_patched) == n:
            return self._shared_qkv(layer, A if len(bp.from_ablated) == n else R)
        out = torch.empty(n, Bt * P, dh, dtype=R.dtype, device=R.device)
        for idx, base in ((bp.from_ablated, A), (bp.from_patched, R)):
            if len(idx):
                W = self._head_qkv[layer][idx.to(R.device)]  # [k, D, dh]
                h = lw.ln1(base).reshape(Bt * P, D) @ W.permute(1, 0, 2).reshape(D, -1)
                out[idx] = h.view(Bt * P, len(idx), dh).transpose(0, 1)
        if len(bp.custom):
            x = custom_inputs(bp, A, R)
            idx = bp.custom.to(R.device)
            out[idx] = torch.bmm(lw.ln1(x).view(len(idx), Bt * P, D), self._head_qkv[layer][idx])
        if self._head_bqkv[layer] is not None:
            out = out + self._head_bqkv[layer]
        return out.view(H, 3, Bt, P, dh).permute(1, 2, 0, 3, 4)

    def _shared_qkv(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values ``[3, B, H, P, dh]`` when every head port reads the same ``x``."""
        B, P, D = x.shape
        h = self.w.layers[layer].ln1(x).reshape(B * P, D) @ self._dest_flat[layer]
        if self._dest_flat_b[layer] is not None:
            h = h + self._dest_flat_b[layer]
        return h.view(B, P, self.H, 3, self.dh).permute(3, 0, 2, 1, 4)

    def _attend(self, layer: int, qkv: torch.Tensor, cos_sin) -> torch.Tensor:
        lw = self.w.layers[layer]
        q, k, v = qkv[0], qkv[1], qkv[2]
        if lw.q_norm is not None:
            q, k = lw.q_norm(q), lw.k_norm(k)
        if cos_sin is not None:
            q, k = _rotate(q, cos_sin), _rotate(k, cos_sin)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=lw.attn_scale)

    def _attn_out(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Sum of the heads' outputs plus the output bias, ``[Bt, P, D]``."""
        lw = self.w.layers[layer]
        Bt, H, P, dh = z.shape
        flat = z.transpose(1, 2).reshape(Bt * P, H * dh)
        out = flat @ self._o_flat[layer] if lw.b_O is None else torch.addmm(lw.b_O, flat, self._o_flat[layer])
        return out.view(Bt, P, self.D)

    def _head_results(self, layer: int, z: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Outputs ``[k, Bt, P, D]`` of the chosen heads (their slices of the output projection)."""
        Bt, H, P, dh = z.shape
        idx = heads.to(z.device)
        zs = z[:, idx].transpose(0, 1).reshape(len(idx), Bt * P, dh)
        return torch.bmm(zs, self.w.layers[layer].W_O[idx]).view(len(idx), Bt, P, self.D)


def _rotate(x: torch.Tensor, cos_sin) -> torch.Tensor:
    """Rotary embedding on the first ``rotary_dim`` features (GPT-NeoX and Llama convention)."""
    cos, sin = cos_sin
    rd = cos.shape[-1]
    rot, keep = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, keep), dim=-1) if keep.shape[-1] else out
