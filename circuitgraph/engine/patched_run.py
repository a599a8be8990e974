"""One patched forward pass of ``C`` circuits, stacked on the batch axis: the reference executor.

The run walks the layers with the shared :class:`~circuitgraph.engine.kernel.Kernel`; what it adds
is where each destination's input comes from (the plan) and a buffer of source deltas
(``patched - ablated``), indexed ``[C, rows, B, P, D]`` so one batched matmul per block mixes them:
``x = A + up * (R - A) + coef . G`` for the destinations the plan builds from deltas.  It can pause at
a layer (returning a :class:`PrefixState`) and resume from one.  A run of one circuit takes the
faster executor of :mod:`circuitgraph.engine.one_circuit`, which computes the same numbers.
"""

from __future__ import annotations

import torch

from circuitgraph.engine.ablation import Ablation, PrefixState
from circuitgraph.engine.plan import BlockPlan, Plan



class PatchedRun:
    """The state of one patched forward pass of a plan's circuits;
    :meth:`PatchEngine.patched_run` builds and runs it."""

    LEAD_ROWS = 0  # buffer rows before the deltas (the one-circuit executor keeps a block's bases there)

    def __init__(self, engine, tokens: torch.Tensor, ablation: Ablation, plan: Plan,
                 logit_positions: torch.Tensor | None = None, start: PrefixState | None = None,
                 stop_layer: int | None = None):
        self.e, self.k, self.plan, self.abl = engine, engine.kernel, plan, ablation
        self.C = plan.n_circuits
        self.B, self.P = tokens.shape
        self.Bt, self.D = self.C * self.B, engine.D
        self.tokens, self.logit_positions, self.start, self.stop_layer = tokens, logit_positions, start, stop_layer
        self.split: int | None = None  # buffer rows below this live in ``start`` (shared by all circuits)
        self.full: list[torch.Tensor] | None = [] if stop_layer is not None else None  # all-row deltas when pausing
        if stop_layer is not None and self.C != 1:
            raise ValueError("a prefix state holds one circuit")

    # ----- the delta buffer ------------------------------------------------------------------
    def _tile(self, t: torch.Tensor) -> torch.Tensor:
        """Ablation tensors are ``[..., B', P', D]`` with ``B'`` in {1, B}: repeat them per circuit."""
        return t if t.shape[-3] == 1 or self.C == 1 else t.repeat(*([1] * (t.dim() - 3)), self.C, 1, 1)

    def _ablated(self, block: int) -> torch.Tensor | None:
        return self.abl.outputs[block] if self.abl.outputs is not None else None

    def _ablated_rows(self, block: int, rows: torch.Tensor) -> torch.Tensor | None:
        """The ablated outputs of a block's ``rows`` (``None``: zero ablation)."""
        abl = self._ablated(block)
        return abl if abl is None or len(rows) == abl.shape[0] else abl[rows.to(abl.device)]

    def _record(self, block: int, rows_out: torch.Tensor | None, every: torch.Tensor | None = None):
        """Keep ``patched - ablated`` for the rows later blocks read (``rows_out`` holds just those rows;
        ``every``, when the block's rows are not all needed, holds all of them for a pausing run)."""
        if self.full is not None:
            out = rows_out if every is None else every
            abl = self._ablated(block)
            out = out.to(self.dbuf.device)
            self.full.append(out if abl is None else out - abl)
        rows = self.plan.needed[block]
        if not len(rows):
            return
        out = rows_out
        abl = self._ablated_rows(block, rows)
        if abl is not None:
            out = out - self._tile(abl)
        o = self.plan.offsets[block]
        out = out.to(self.dbuf.device)
        # ``out`` may hold one position per example (the last MLP, see run): written to every position
        self.dbuf[:, o:o + len(rows)] = out.view(len(rows), self.C, self.B, out.shape[-2], self.D).transpose(0, 1)

    # ----- destination inputs -----------------------------------------------------------------
    def _custom_inputs(self, bp: BlockPlan, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``[n_custom, Bt, P, D]`` inputs of the destinations built from deltas."""
        n, B, P, D, C = len(bp.custom), self.B, self.P, self.D, self.C
        if bp.up is not None and bool(bp.up.any()):
            up = bp.up.repeat_interleave(B, dim=1)[:, :, None, None]  # [n, Bt, 1, 1]
            x = A + up * (R - A)
        else:
            x = A.expand(n, self.Bt, P, D)
        if bp.coef is None:
            return x
        if self.split is not None:
            return x + self._resumed_mix(bp, n)
        dbuf = self.dbuf
        G = dbuf[:, :bp.prefix] if bp.gather is None else dbuf[:, bp.gather.to(dbuf.device)]
        K = G.shape[1]
        if bp.positional:
            mix = torch.einsum("kbpd,knbp->nbpd", G[0], bp.coef)
        else:
            mix = torch.bmm(bp.coef.transpose(1, 2), G.reshape(C, K, -1))  # [C, n, B*P*D]
            mix = mix.view(C, n, B, P, D).transpose(0, 1).reshape(n, self.Bt, P, D)
        return x + mix

    def _resumed_mix(self, bp: BlockPlan, n: int) -> torch.Tensor:
        """The mix when rows before ``split`` live in the prefix state (one copy for all circuits)."""
        dbuf, C = self.dbuf, self.C
        rows = bp.gather.to(dbuf.device) if bp.gather is not None else torch.arange(bp.prefix, device=dbuf.device)
        coef = bp.coef  # [C, K, n]
        pre = rows < self.split
        mix = 0
        if bool(pre.any()):
            Gp = self.start.flat[self.plan.buffer_sources[rows[pre]].to(dbuf.device)]  # [Kp, B, P, D]
            mix = torch.einsum("kx,ckn->cnx", Gp.reshape(Gp.shape[0], -1), coef[:, pre])
        if bool((~pre).any()):
            Gq = dbuf[:, rows[~pre]]  # [C, Kq, B, P, D]
            mix = mix + torch.bmm(coef[:, ~pre].transpose(1, 2), Gq.reshape(C, Gq.shape[1], -1))
        return mix.view(C, n, self.B, self.P, self.D).transpose(0, 1).reshape(n, self.Bt, self.P, self.D)

    def _single_input(self, bi: int, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Input of a one-destination block (an MLP or the logits)."""
        bp = self.plan.blocks[bi]
        if len(bp.from_patched):
            return R
        if len(bp.from_ablated):
            return A
        return self._custom_inputs(bp, A, R)[0]

    def _qkv(self, layer: int, A: torch.Tensor, R: torch.Tensor):
        """Queries, keys and values of one layer under the plan (keys/values per query head unless shared).

        Ports reading ``A`` or ``R`` unchanged take their values from one fused projection of that base
        (``A``'s is cached on the ablation: it is the same for every circuit); only the others are
        projected port by port."""
        bp = self.plan.blocks[2 * layer]
        H, n = self.e.H, 3 * self.e.H
        if len(bp.from_ablated) == n or len(bp.from_patched) == n:
            return self.k.shared_qkv(layer, A if len(bp.from_ablated) == n else R)
        dev = self.k.device(layer)
        outs = tuple(R.new_empty(self.Bt, H, self.P, self.e.dh, device=dev) for _ in range(3))
        group = self.e.w.layers[layer].attn.group

        def fill(ports, vals, per_port: bool):
            ports = ports.to(dev)
            heads, kinds = ports // 3, ports % 3
            for kind in range(3):
                sel = kinds == kind
                if not bool(sel.any()):
                    continue
                h = heads[sel]
                if per_port:  # vals [n, Bt, P, dh], one row per port
                    outs[kind][:, h] = vals[sel].transpose(0, 1)
                else:  # vals (q, k, v) of a shared projection; keys and values may be grouped
                    outs[kind][:, h] = vals[kind][:, h if kind == 0 else h // group]

        if len(bp.from_ablated):
            fill(bp.from_ablated, self._ablated_qkv(layer, A), False)
        if len(bp.from_patched):
            fill(bp.from_patched, self.k.shared_qkv(layer, R), False)
        if len(bp.custom):
            fill(bp.custom, self._custom_port_values(layer, bp, A, R), True)
        return outs

    def _custom_port_values(self, layer: int, bp: BlockPlan, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Values ``[n_custom, Bt, P, dh]`` of a layer's custom head ports."""
        return self.k.port_qkv(layer, self._custom_inputs(bp, A, R), bp.custom)

    def _ablated_qkv(self, layer: int, A: torch.Tensor):
        if self.C != 1:
            return self.k.shared_qkv(layer, A)
        cache = self.abl.qkv_cache
        if layer not in cache:  # on the ablation's own (unexpanded) shape; broadcast when filled
            cache[layer] = self.k.shared_qkv(layer, self.abl.resid[2 * layer])
        return cache[layer]

    # ----- the run ---------------------------------------------------------------------------
    def run(self):
        """Logits ``[C, B, vocab]`` (at ``logit_positions``) or ``[C, B, P, vocab]``; or the prefix state."""
        e, plan, C, P, Bt, D = self.e, self.plan, self.C, self.P, self.Bt, self.D
        toks = self.tokens.repeat(C, 1) if C > 1 else self.tokens
        emb = e.w.embed(toks)
        rope = self.k.rotary(P, emb)
        copy_start = self.start is not None and (C == 1 or any(bp.positional for bp in plan.blocks))
        self.lead = self._allocate(emb, self.LEAD_ROWS + plan.n_rows, copy_start)
        self.dbuf = self.lead[:, self.LEAD_ROWS:]
        if self.start is None:
            resid, first = emb, 0
            self._record(0, emb[None])
        else:
            st = self.start
            resid, first = (st.resid.repeat(C, 1, 1) if C > 1 else st.resid), st.layer
            if copy_start:  # the simple way: copy the state into the buffer
                for block in range(1 + 2 * first):
                    rows = plan.needed[block]
                    if len(rows):
                        o = plan.offsets[block]
                        self.dbuf[:, o:o + len(rows)] = st.deltas[block][rows.to(self.dbuf.device)][None]
            else:
                self.split = plan.offsets[1 + 2 * first] if 1 + 2 * first < len(plan.offsets) else plan.n_rows
        last_layer = len(e.w.layers) if self.stop_layer is None else self.stop_layer
        for layer in range(first, last_layer):
            A = self._tile(self.abl.resid[2 * layer]).expand(Bt, P, D)
            A_mid = self._tile(self.abl.resid[2 * layer + 1]).expand(Bt, P, D)
            mlp_input = lambda R_mid, layer=layer, A_mid=A_mid: self._single_input(2 * layer + 1, A_mid, R_mid.to(emb.device))
            if layer == len(e.w.layers) - 1 and self._reads_positions_only():
                # the last MLP feeds only the logits, read at one position per example: run it there alone
                # (its output broadcasts over the positions of the residual, which nothing reads elsewhere)
                at = (torch.arange(Bt, device=emb.device), self._positions())
                mlp_input = lambda R_mid, inner=mlp_input, at=at: inner(R_mid)[at][:, None]

            out = self.k.block(layer, resid, rope[layer], qkv=self._qkv(layer, A, resid), mlp_input=mlp_input,
                               **self._head_hooks(layer))
            self._record(2 + 2 * layer, out.mlp[None])
            resid = out.resid.to(emb.device)
        if self.stop_layer is not None:  # resumed: the blocks before ``start`` are the start's
            return PrefixState(self.stop_layer, resid, (list(self.start.deltas) if self.start is not None else []) + self.full)
        return self._logits(resid)

    def _allocate(self, emb: torch.Tensor, rows: int, copy_start: bool) -> torch.Tensor:
        """The delta buffer ``[C, rows, B, P, D]``."""
        return self.e.workspace("deltas", (self.C, rows, self.B, self.P, self.D), emb)

    def _head_hooks(self, layer: int) -> dict:
        """How :meth:`Kernel.block` hands this layer's heads over: to :meth:`_store_heads` after attention."""
        return dict(on_attn=lambda z, inv: self._store_heads(layer, z, inv))

    def _store_heads(self, layer: int, z: torch.Tensor, inv, summed: bool = False):
        """Record the layer's head outputs (the rows later blocks read; every head when pausing)."""
        rows = self.plan.needed[1 + 2 * layer]
        if self.full is not None:  # pausing keeps every head: compute them once, take the rows from them
            every = self.k.head_outputs(layer, z, torch.arange(self.e.H), inv)
            self._record(1 + 2 * layer, every[rows.to(every.device)], every)
        else:
            self._record(1 + 2 * layer, self.k.head_outputs(layer, z, rows, inv) if len(rows) else None)

    def _positions(self) -> torch.Tensor:
        """``[Bt]`` the logit positions, repeated per circuit."""
        lp = self.logit_positions
        return lp.repeat(self.C) if self.C > 1 else lp

    def _reads_positions_only(self) -> bool:
        """Whether the run ends in logits at one position per example built from those positions alone."""
        return (self.logit_positions is not None and self.stop_layer is None
                and not self.plan.blocks[-1].positional)

    def _logits(self, resid: torch.Tensor) -> torch.Tensor:
        e, plan, C, B, P, Bt, D = self.e, self.plan, self.C, self.B, self.P, self.Bt, self.D
        A = self._tile(self.abl.resid[-1]).expand(Bt, P, D)
        lp = self.logit_positions
        positions = None if lp is None else self._positions()
        bp = plan.blocks[-1]
        if not self._reads_positions_only():
            logits = self.k.unembed(self._single_input(len(e.dst_blocks) - 1, A, resid), positions)
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
            b_idx = torch.arange(B, device=resid.device)
            coef = bp.coef[:, :, 0]  # [C, K]
            lim = self.split if self.split is not None else plan.n_rows
            pre, post = rows < lim, rows >= lim
            mix = 0
            if self.split is not None and bool(pre.any()):
                src = plan.buffer_sources[rows[pre]].to(resid.device)
                G = self.start.flat[src[:, None], b_idx[None], lp[None]]  # [Kp, B, D]
                mix = torch.einsum("kbd,ck->cbd", G, coef[:, pre])
            sel = post if self.split is not None else torch.ones_like(post)
            if bool(sel.any()):
                G = self.dbuf[:, rows[sel][:, None], b_idx[None], lp[None]]  # [C, K, B, D]: only the read positions
                mix = mix + torch.einsum("ckbd,ck->cbd", G, coef[:, sel])
            final = final + mix.reshape(Bt, D) if torch.is_tensor(mix) else final
        return self.k.unembed(final).view(C, B, -1)
