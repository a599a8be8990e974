"""The one-circuit executor: a patched run of one circuit, computing what :class:`PatchedRun` computes, faster
on a CPU.  Its own compile step (:func:`compile_one_circuit`) turns each block of a one-circuit plan into a
single product whose columns also hold the bases (``A``, ``R``), sparse (CSR) or dense, and lets a layer's
heads also sum its MLP's terms; the run keeps the delta buffer token-major when the plan's dense mixes
outweigh its sparse ones, mixes, normalises and projects a few tokens at a time in cache, projects grouped
keys and values with their own weights, writes head outputs straight into the buffer and sums them as the
attention output.  :meth:`PatchEngine.patched_run` takes it for every one-circuit plan (a block without
a product, e.g. a position-restricted one, takes the reference path); ``tests/test_engine.py`` checks
both executors against the by-hand forward, and against each other.
"""

from __future__ import annotations

import warnings

import torch

from circuitgraph.engine.patched_run import PatchedRun
from circuitgraph.engine.plan import BlockPlan, Plan

# A one-circuit block mixes its deltas with a sparse product below this fraction of non-zero
# coefficients (measured on CPU: 2x faster than a dense product at 10%, 2.5x slower at 30%).
SPARSE_BELOW = 0.15
# Row gathers use advanced indexing: on CPUs ``index_select`` over rows of this width measured ~14x slower.
LEAD = 2  # buffer rows before the deltas, holding a block's bases (A, R) during its mix
FULL = (torch.float32, torch.float64)  # precisions that take the token-major layout on a CPU
CPU_CHUNK_BYTES = 4 << 20  # layers mix and project at most this much input at a time on a CPU
MIN_CHUNK_TOKENS = 32  # ... but at least this many tokens, so each port's weights serve many (wide models)
# a sparse mix reads at most this much of its rows at a time, about the size of the L2 caches (16 MiB made a
# Llama-3.2-1B-shaped 10% circuit 1.12x slower; GPT-2 and Qwen2-0.5B shapes measured the same either way)
SPARSE_OPERAND_BYTES = 2 << 20


def compile_one_circuit(plan: Plan) -> Plan:
    """Add the one-circuit products to a plan of one circuit (in place): per block not restricted to
    positions, its custom ports ordered by kind (q, k, v) then head, so a whole kind projects with its
    weights' view, and its coefficients as one product (:func:`_one_circuit_mix`); each layer's heads
    summing their MLP's terms too (:func:`_fuse_mlp_partial`); the buffer layout its mixes favour."""
    if plan.n_circuits != 1:
        return plan
    for bp in plan.blocks:
        if bp.positional or not len(bp.custom):
            continue
        custom = bp.custom
        order = torch.argsort((custom % 3) * len(custom) + custom // 3)
        bp.custom, bp.up = custom[order], bp.up[order]
        if bp.coef is not None:
            bp.coef = bp.coef[:, :, order]
            for name, value in _one_circuit_mix(bp.coef[0].T, bp.up[:, 0] > 0.5, bp.prefix, bp.gather).items():
                setattr(bp, name, value)
    for heads, mlp in zip(plan.blocks[0:-1:2], plan.blocks[1::2]):
        _fuse_mlp_partial(heads, mlp)
    work = {False: 0, True: 0}  # multiply-adds per token / D of the sparse and the dense whole-prefix mixes
    for bp in plan.blocks:
        if bp.mix is not None and bp.mix_rows is None:
            work[bp.mix.layout != torch.sparse_csr] += bp.mix.shape[0] * bp.mix.shape[1]
    plan.token_major = work[True] > work[False] and not any(bp.positional for bp in plan.blocks)
    return plan


def _one_circuit_mix(coef: torch.Tensor, on_r: torch.Tensor, prefix: int, gather: torch.Tensor | None) -> dict:
    """One circuit's block as a single product: coefficients ``coef`` [n, rows read] extended by a
    column per base in use (1 for the ports on it), so bases are added by the same product that mixes
    the deltas; sparse (CSR over the whole prefix) below :data:`SPARSE_BELOW` non-zero."""
    bases = tuple(name for name, on in (("A", ~on_r), ("R", on_r)) if bool(on.any()))
    cols = torch.stack([(~on_r if b == "A" else on_r).to(coef.dtype) for b in bases], 1)
    full = coef if gather is None else coef.new_zeros(len(coef), prefix).index_copy_(1, gather.to(coef.device), coef)
    if coef.dtype in (torch.float32, torch.float64) and float((full != 0).float().mean()) < SPARSE_BELOW:
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is tested
            warnings.simplefilter("ignore")
            return dict(mix=torch.cat([cols, full], 1).to_sparse_csr(), bases=bases)
    mix = torch.cat([cols, coef], 1)
    if gather is None:
        return dict(mix=mix, bases=bases)
    return dict(mix=mix, mix_rows=torch.cat([torch.arange(-len(bases), 0), gather]).to(coef.device), bases=bases)


def _fuse_mlp_partial(heads: BlockPlan, mlp: BlockPlan):
    """Let the heads' product also sum the MLP's terms over the rows the heads read (one more output
    row, while those rows are in cache), so the MLP reads only its own layer's head rows again."""
    if heads.mix is None or heads.mix_rows is not None or mlp.mix is None:
        return
    c = mlp.coef[0, :, 0]  # the MLP's coefficients over its rows read
    full = c if mlp.gather is None else c.new_zeros(mlp.prefix).index_copy_(0, mlp.gather.to(c.device), c)
    split = heads.prefix
    if not bool(full[:split].any()):
        return
    sparse = heads.mix.layout == torch.sparse_csr
    mix = heads.mix.to_dense() if sparse else heads.mix
    row = torch.cat([mix.new_zeros(len(heads.bases)), full[:split]])
    mix = torch.cat([mix, row[None]])
    if sparse:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mix = mix.to_sparse_csr()
    heads.mix, heads.partial = mix, True
    mlp.mix, mlp.mix_rows, mlp.from_partial, mlp.start = full[split:][None].contiguous(), None, True, split


class OneCircuitRun(PatchedRun):
    """A patched run of one circuit (see the module docstring); blocks without a one-circuit product take
    :class:`PatchedRun`'s path."""

    LEAD_ROWS = LEAD

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.partial: torch.Tensor | None = None  # [B * P, D] the next MLP's partial sum (see the plan's ``partial``)

    def _allocate(self, emb: torch.Tensor, rows: int, copy_start: bool) -> torch.Tensor:
        """The delta buffer; token-major (each token's rows contiguous, the operand :meth:`_mix_rows`
        multiplies token by token) when the plan favours it, on a CPU in full precision."""
        self.cpu_full = emb.device.type == "cpu" and emb.dtype in FULL
        self.token_major = self.plan.token_major and self.cpu_full and (self.start is None or copy_start)
        if self.token_major:
            return self.e.workspace("deltas", (1, self.B, self.P, rows, self.D), emb).permute(0, 3, 1, 2, 4)
        return super()._allocate(emb, rows, copy_start)

    def _fast(self, bp: BlockPlan) -> bool:
        """Whether block ``bp`` has a one-circuit product (:func:`compile_one_circuit`)."""
        return bp.mix is not None

    def _custom_inputs(self, bp: BlockPlan, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``[n_custom, B, P, D]`` inputs of the destinations built from deltas, by the block's product."""
        if not self._fast(bp):
            return super()._custom_inputs(bp, A, R)
        n, P, D = len(bp.custom), self.P, self.D
        if bp.from_partial:  # one destination: the heads' partial sum, base, own rows
            x = self.partial.view(self.Bt, P, D)
            x += A if bp.bases[0] == "A" else R
            if bp.prefix > bp.start:
                rows = self.dbuf[0, bp.start:bp.prefix].flatten(1, 2)  # [K, B * P, D]
                if self.token_major:
                    x.view(-1, 1, D).baddbmm_(bp.mix.expand(rows.shape[1], 1, -1), rows.transpose(0, 1))
                else:
                    x.view(1, -1).addmm_(bp.mix, rows.reshape(len(rows), -1))
            return x[None]
        self._stage_bases(bp, A, R)
        x, token_major = self._mix_rows(bp, 0, self.Bt * P)
        return (x.transpose(0, 1) if token_major else x).reshape(n, self.Bt, P, D)

    def _qkv(self, layer: int, A: torch.Tensor, R: torch.Tensor):
        """As :meth:`PatchedRun._qkv`; a layer whose ports are all custom takes views of its projected values
        (the plan orders them by kind, then head)."""
        bp = self.plan.blocks[2 * layer]
        if len(bp.custom) == 3 * self.e.H and self._fast(bp):
            vals = self._project_custom(layer, bp, A, R)
            return tuple(vals[j * self.e.H:(j + 1) * self.e.H].transpose(0, 1) for j in range(3))
        return super()._qkv(layer, A, R)

    def _custom_port_values(self, layer: int, bp: BlockPlan, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        if not self._fast(bp):
            return super()._custom_port_values(layer, bp, A, R)
        return self._project_custom(layer, bp, A, R)

    def _head_hooks(self, layer: int) -> dict:
        """Every head recorded, no post-norm, on a CPU in full precision: the heads' outputs, written into the
        buffer, are summed as the attention output (a tenth of the output projection's time with the rows of
        a token side by side, and a Llama-3.2-1B-shaped 10% circuit 1.05x faster with them row-major)."""
        if (self.cpu_full and self.full is None and len(self.plan.needed[1 + 2 * layer]) == self.e.H
                and self.e.w.layers[layer].post_attn is None):
            return dict(attn_from=lambda z: self._store_heads(layer, z, None, summed=True))
        return super()._head_hooks(layer)

    def _store_heads(self, layer: int, z: torch.Tensor, inv, summed: bool = False):
        """Head outputs straight into the buffer; with ``summed``, their sum (plus the output bias) returned as
        the attention output, or None where they were not written there."""
        rows = self.plan.needed[1 + 2 * layer]
        if self.full is not None or not len(rows) or z.device != self.dbuf.device:
            return super()._store_heads(layer, z, inv, summed)
        o = self.plan.offsets[1 + 2 * layer]
        slot = self.k.head_outputs(layer, z, rows, inv, out=self.dbuf[0, o:o + len(rows)])
        attn = slot.sum(0) if summed else None
        b_O = self.e.w.layers[layer].attn.b_O
        if summed and b_O is not None:
            attn += b_O
        abl = self._ablated_rows(1 + 2 * layer, rows)
        if abl is not None:
            slot.sub_(abl)
        return attn

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
