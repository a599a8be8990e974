"""One patched forward pass of ``C`` circuits, stacked on the batch axis.

The run walks the layers with the shared :class:`~circuitgraph.engine.kernel.Kernel`; what it adds
is where each destination's input comes from (the plan) and a buffer of source deltas
(``patched - ablated``), indexed ``[C, rows, B, P, D]`` so one batched matmul per block mixes them (a
mostly dense circuit, run alone on a CPU, stores it token-major: see :meth:`PatchedRun._mix_rows`).
It can pause at a layer (returning a :class:`PrefixState`) and resume from one.
"""

from __future__ import annotations

import torch

from circuitgraph.engine.ablation import Ablation, PrefixState
from circuitgraph.engine.plan import BlockPlan, Plan


# Row gathers use advanced indexing: on CPUs ``index_select`` over rows of this width measured ~14x slower.
LEAD = 2  # one circuit: buffer rows before the deltas, holding a block's bases (A, R) during its mix
FULL = (torch.float32, torch.float64)  # precisions that take the token-major layout on a CPU
CPU_CHUNK_BYTES = 4 << 20  # one-circuit layers mix and project at most this much input at a time on a CPU
MIN_CHUNK_TOKENS = 32  # ... but at least this many tokens, so each port's weights serve many (wide models)
# a sparse mix reads at most this much of its rows at a time, about the size of the L2 caches (16 MiB made a
# Llama-3.2-1B-shaped 10% circuit 1.12x slower; GPT-2 and Qwen2-0.5B shapes measured the same either way)
SPARSE_OPERAND_BYTES = 2 << 20


class PatchedRun:
    """The state of one patched forward pass of a plan's circuits;
    :meth:`PatchEngine.patched_run` builds and runs it."""

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
        self.partial: torch.Tensor | None = None  # [B * P, D] the next MLP's partial sum (see the plan's ``partial``)
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
        if self._one_circuit(bp) and bp.from_partial:  # one destination: the heads' partial sum, base, own rows
            x = self.partial.view(self.Bt, P, D)
            x += A if bp.bases[0] == "A" else R
            if bp.prefix > bp.start:
                rows = self.dbuf[0, bp.start:bp.prefix].flatten(1, 2)  # [K, B * P, D]
                if self.token_major:
                    x.view(-1, 1, D).baddbmm_(bp.mix.expand(rows.shape[1], 1, -1), rows.transpose(0, 1))
                else:
                    x.view(1, -1).addmm_(bp.mix, rows.reshape(len(rows), -1))
            return x[None]
        if self._one_circuit(bp):
            self._stage_bases(bp, A, R)
            x, token_major = self._mix_rows(bp, 0, self.Bt * P)
            return (x.transpose(0, 1) if token_major else x).reshape(n, self.Bt, P, D)
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
        else:  # several circuits (one circuit took _mix_rows)
            mix = torch.bmm(bp.coef.transpose(1, 2), G.reshape(C, K, -1))  # [C, n, B*P*D]
            mix = mix.view(C, n, B, P, D).transpose(0, 1).reshape(n, self.Bt, P, D)
        return x + mix

    def _one_circuit(self, bp: BlockPlan) -> bool:
        """Whether block ``bp`` takes the one-circuit path (:meth:`_mix_rows`)."""
        return self.C == 1 and bp.mix is not None and self.split is None

    def _stage_bases(self, bp: BlockPlan, A: torch.Tensor, R: torch.Tensor):
        """Write the bases a one-circuit block adds into the rows before the buffer's first."""
        for i, name in enumerate(bp.bases):
            self.lead[0, LEAD - len(bp.bases) + i].copy_(A if name == "A" else R)

    def _mix_rows(self, bp: BlockPlan, t0: int, t1: int, out: torch.Tensor | None = None):
        """One circuit: inputs of the custom destinations at flattened token rows ``t0:t1``, bases
        included (:meth:`_stage_bases` first), as ``(x, token_major)``: ``x`` is ``[t1 - t0, n, D]``
        when token-major, else ``[n, t1 - t0, D]`` (written into ``out``, ``n * (t1 - t0) * D``
        elements, when given).  Dense fp32 mixes on a CPU run token by token on the token-major buffer:
        one batched product whose per-token operands are contiguous (measured 1.3x the rate of the same
        product on row-major rows, and 1.7x that of one wide product, whose operand BLAS must repack).
        In half precision a CPU's batched product first copies such operands (measured at 0.4x the rate
        of one wide product), so those take the wide product, as other devices do."""
        G = self.lead[0].view(self.lead.shape[1], -1, self.D)  # row LEAD is the buffer's first
        n, T, K = bp.mix.shape[0], t1 - t0, bp.mix.shape[1]
        first = LEAD - len(bp.bases)
        rows = G[first:first + K, t0:t1] if bp.mix_rows is None else G[bp.mix_rows.to(G.device) + LEAD, t0:t1]  # [K, T, D]
        if bp.mix.layout == torch.sparse_csr and n == 1 and self.token_major:  # a weighted sum of a few rows, no copy
            x = out.view(T, 1, self.D) if out is not None else G.new_empty(T, 1, self.D)
            terms = zip(bp.mix.col_indices().tolist(), bp.mix.values().tolist())
            k, c = next(terms)
            torch.mul(rows[k], c, out=x[:, 0])
            for k, c in terms:
                x[:, 0].add_(rows[k], alpha=c)
            return x, True
        if bp.mix.layout == torch.sparse_csr:  # a few tokens at a time, so the rows read stay in cache
            x = out.view(n, T, self.D) if out is not None else G.new_empty(n, T, self.D)
            step = T if G.device.type != "cpu" else max(1, SPARSE_OPERAND_BYTES // (K * self.D * G.element_size()))
            for s0 in range(0, T, step):
                part = rows[:, s0:s0 + step]
                t = part.shape[1]
                flat = part.reshape(K, -1) if not self.token_major else \
                    self.e.workspace("sparse operand", (K, t, self.D), G).copy_(part).view(K, -1)  # token-major: copied
                dst = x.view(n, -1) if t == T else self.e.workspace("sparse product", (n, t * self.D), G)
                torch.addmm(dst, bp.mix, flat, beta=0, out=dst)
                if t != T:
                    x[:, s0:s0 + t] = dst.view(n, t, self.D)
            return x, False
        if G.device.type == "cpu" and G.dtype in FULL:  # token by token, on either layout
            x = out.view(T, n, self.D) if out is not None else G.new_empty(T, n, self.D)
            return torch.bmm(bp.mix.expand(T, n, K), rows.transpose(0, 1), out=x), True
        x = bp.mix @ rows.reshape(K, -1) if out is None else torch.mm(bp.mix, rows.reshape(K, -1), out=out.view(n, -1))
        return x.view(n, T, self.D), False

    def _chunk_rows(self, n: int, itemsize: int) -> int:
        """Token rows per chunk of a one-circuit layer: on a CPU, chunks small enough that each input
        chunk stays in cache from the mix through the norm and projection (measured 1.5-2.5x faster
        per layer than whole-batch tensors), yet of at least :data:`MIN_CHUNK_TOKENS` tokens (a chunk
        of 5 tokens made a Llama-3.2-1B-shaped run 1.25x slower, its port projections re-reading
        their weights for every few tokens); elsewhere the whole batch."""
        if self.dbuf.device.type != "cpu":
            return self.Bt * self.P
        return max(MIN_CHUNK_TOKENS, CPU_CHUNK_BYTES // (n * self.D * itemsize))

    def _project_custom(self, layer: int, bp: BlockPlan, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """One circuit: values ``[n, Bt, P, dh]`` of a layer's custom head ports, mixed and projected
        chunk by chunk; ports come in runs of one kind (see the plan), each projected with its weights
        gathered once (or, a whole kind in head order, with the weights' own view)."""
        n, BP = len(bp.custom), self.Bt * self.P
        rows_out = n + bp.partial  # the mix's last row: the MLP's partial sum (see the plan)
        kinds = (bp.custom % 3).tolist()
        runs, lo = [], 0
        for i in range(1, n + 1):
            if i == n or kinds[i] != kinds[lo]:
                runs += self._port_runs(layer, lo, bp.custom[lo:i])
                lo = i
        self._stage_bases(bp, A, R)
        step = min(BP, self._chunk_rows(rows_out, R.element_size()))
        vals = R.new_empty(n, BP, self.e.dh, device=self.k.device(layer))
        xbuf = self.e.workspace("chunk", (rows_out * step * self.D,), R)
        nbuf = self.e.workspace("chunk normed", (rows_out * step * self.D,), R)
        if bp.partial:
            self.partial = self.e.workspace("partial", (BP, self.D), R)
        ln = self.e.w.layers[layer].ln1
        for t0 in range(0, BP, step):
            t1 = min(t0 + step, BP)
            x, token_major = self._mix_rows(bp, t0, t1, xbuf[:rows_out * (t1 - t0) * self.D])
            if bp.partial:
                self.partial[t0:t1] = x[:, n] if token_major else x[n]
            xn = ln.into(x, nbuf[:x.numel()].view(x.shape)) if ln is not None else x  # a per-row norm: either layout
            xn = xn.transpose(0, 1) if token_major else xn  # [n, T, D]
            for rows, ports, weights, stack in runs:
                xr = xn[rows]  # [m, T, D]
                if stack > 1:  # a group's query heads side by side on the token axis (a view: rows are contiguous)
                    xr = xr.reshape(len(ports), stack * (t1 - t0), self.D)
                out = self.k.project_ports(layer, xr[:, None], ports, weights)[:, 0]
                vals[rows, t0:t1] = out.view(-1, t1 - t0, self.e.dh)
        return vals.view(n, self.Bt, self.P, self.e.dh)

    def _port_runs(self, layer: int, lo: int, ports: torch.Tensor) -> list:
        """``(rows, ports, weights, stack)`` to project one kind's run of ports (custom rows ``lo:``) with.
        Keys or values of every head in order, with grouped key/value heads, use the key/value weights
        themselves, so no weight is repeated per query head: with port inputs row-major, each group's
        query heads stacked on the token axis (``stack``), one product per kind instead of ``group`` (the
        Llama-3.1-8B shape in bf16 over 16 tokens ran 1.01x faster; a Llama-3.2-1B-shaped fp32 10%
        circuit the same); token-major, as ``group`` strided runs (stacking would copy every input)."""
        a, H = self.e.w.layers[layer].attn, self.e.H
        kind = int(ports[0]) % 3
        if kind and a.group > 1 and len(ports) == H and bool((ports // 3 == torch.arange(H, device=ports.device)).all()):
            weights = (a.W_K, a.b_K) if kind == 1 else (a.W_V, a.b_V)
            if not self.token_major:
                return [(slice(lo, lo + H), ports[::a.group], weights, a.group)]
            return [(slice(lo + j, lo + H, a.group), ports[j::a.group], weights, 1) for j in range(a.group)]
        return [(slice(lo, lo + len(ports)), ports, self.k.port_weights(layer, ports), 1)]

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
        if len(bp.custom) == n and self._one_circuit(bp):  # the plan orders them by kind, then head: views of the values
            vals = self._project_custom(layer, bp, A, R)
            return tuple(vals[j * H:(j + 1) * H].transpose(0, 1) for j in range(3))
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
            vals = (self._project_custom(layer, bp, A, R) if self._one_circuit(bp)
                    else self.k.port_qkv(layer, self._custom_inputs(bp, A, R), bp.custom))
            fill(bp.custom, vals, True)
        return outs

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
        e, plan, C, B, P, Bt, D = self.e, self.plan, self.C, self.B, self.P, self.Bt, self.D
        toks = self.tokens.repeat(C, 1) if C > 1 else self.tokens
        emb = e.w.embed(toks)
        rope = self.k.rotary(P, emb)
        lead = LEAD if C == 1 else 0  # rows for a one-circuit block's bases (see _stage_bases)
        rows = lead + plan.n_rows
        # token-major: each token's rows contiguous, the operand :meth:`_mix_rows` multiplies token by token
        cpu_full = emb.device.type == "cpu" and emb.dtype in FULL
        copy_start = self.start is not None and (C == 1 or any(bp.positional for bp in plan.blocks))
        self.token_major = plan.token_major and cpu_full and (self.start is None or copy_start)
        if self.token_major:
            self.lead = e.workspace("deltas", (C, B, P, rows, D), emb).permute(0, 3, 1, 2, 4)
        else:
            self.lead = e.workspace("deltas", (C, rows, B, P, D), emb)
        self.dbuf = self.lead[:, lead:]
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
        all_heads = torch.arange(e.H)
        for layer in range(first, last_layer):
            A = self._tile(self.abl.resid[2 * layer]).expand(Bt, P, D)
            A_mid = self._tile(self.abl.resid[2 * layer + 1]).expand(Bt, P, D)
            mlp_input = lambda R_mid, layer=layer, A_mid=A_mid: self._single_input(2 * layer + 1, A_mid, R_mid.to(emb.device))
            if layer == len(e.w.layers) - 1 and self._reads_positions_only():
                # the last MLP feeds only the logits, read at one position per example: run it there alone
                # (its output broadcasts over the positions of the residual, which nothing reads elsewhere)
                at = (torch.arange(Bt, device=emb.device), self._positions())
                mlp_input = lambda R_mid, inner=mlp_input, at=at: inner(R_mid)[at][:, None]

            def store_heads(z, inv, layer=layer, summed=False):
                """Record the layer's head outputs; ``summed`` (every head recorded, no post-norm): return
                their sum as the attention output, or None where they were not written into the buffer
                (on a CPU in full precision: a tenth of the output projection's time with the rows of a token
                side by side, and a Llama-3.2-1B-shaped 10% circuit 1.05x faster with them row-major)."""
                rows = plan.needed[1 + 2 * layer]
                if self.full is not None:  # pausing keeps every head: compute them once, take the rows from them
                    every = self.k.head_outputs(layer, z, all_heads, inv)
                    self._record(1 + 2 * layer, every[rows.to(every.device)], every)
                elif C == 1 and len(rows) and z.device == self.dbuf.device:  # one circuit: straight into the buffer
                    o = plan.offsets[1 + 2 * layer]
                    slot = self.k.head_outputs(layer, z, rows, inv, out=self.dbuf[0, o:o + len(rows)])
                    attn = slot.sum(0) if summed else None
                    if summed and e.w.layers[layer].attn.b_O is not None:
                        attn += e.w.layers[layer].attn.b_O
                    abl = self._ablated_rows(1 + 2 * layer, rows)
                    if abl is not None:
                        slot.sub_(abl)
                    return attn
                else:
                    self._record(1 + 2 * layer, self.k.head_outputs(layer, z, rows, inv) if len(rows) else None)

            sum_heads = (cpu_full and self.full is None and len(plan.needed[1 + 2 * layer]) == e.H
                         and e.w.layers[layer].post_attn is None)
            out = self.k.block(layer, resid, rope[layer], qkv=self._qkv(layer, A, resid), mlp_input=mlp_input,
                               **(dict(attn_from=lambda z, f=store_heads: f(z, None, summed=True)) if sum_heads
                                  else dict(on_attn=store_heads)))
            self._record(2 + 2 * layer, out.mlp[None])
            resid = out.resid.to(emb.device)
        if self.stop_layer is not None:  # resumed: the blocks before ``start`` are the start's
            return PrefixState(self.stop_layer, resid, (list(self.start.deltas) if self.start is not None else []) + self.full)
        return self._logits(resid)

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
