"""Compiling circuits into a :class:`Plan`: how each destination block of a patched run gets its inputs.

Every destination input is ``x_d = A_d + sum_{s in circuit} delta_s = R_d - sum_{s not in circuit} delta_s``
(``A``: the all-ablated residual, ``R``: the patched run's own, ``delta_s``: patched minus ablated
source output).  The plan picks, per destination, whichever sum has fewer terms and which source
rows later blocks need, so a circuit costs work proportional to the smaller of itself and its complement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SourceBlock:
    """A run of consecutive sources computed together: ``input``, one layer's heads, or one MLP."""

    start: int
    stop: int


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
    # filled by the one-circuit executor's compile step (circuitgraph.engine.one_circuit), for one circuit
    # not restricted to positions: the whole input as one product, bases included.  The run keeps the
    # bases named in ``bases`` in the rows just before the buffer's first (rows -len(bases)..-1); ``mix``
    # [n_custom, rows read] (dense, or CSR when sparse) multiplies buffer rows ``mix_rows`` (None: the
    # bases' rows, then the prefix)
    mix: torch.Tensor | None = None
    mix_rows: torch.Tensor | None = None
    bases: tuple[str, ...] = ()
    # one circuit, a layer's heads and its MLP: the heads' product has one more row, the MLP's sum over
    # the rows the heads read (``partial``), so the MLP (``from_partial``) mixes only the rows after them
    # (``mix`` [1, prefix - start] over rows ``start:prefix``) and adds its base
    partial: bool = False
    from_partial: bool = False
    start: int = 0


@dataclass
class Plan:
    """A compiled set of ``C`` circuits for one batch shape."""

    n_circuits: int
    blocks: list[BlockPlan] = field(default_factory=list)
    needed: list[torch.Tensor] = field(default_factory=list)  # per source block: local rows whose deltas are used
    offsets: list[int] = field(default_factory=list)  # per source block: its first row in the delta buffer
    n_rows: int = 0
    buffer_sources: torch.Tensor | None = None  # global source index of each buffer row
    # one circuit, not position-restricted, whose dense mixes outweigh its sparse ones: a CPU run stores its
    # delta buffer token-major (set by one_circuit.compile_one_circuit; see OneCircuitRun._mix_rows; measured
    # 10% faster per run at 50% of edges, 10% slower at 10% or 90%)
    token_major: bool = False


def compile_plan(engine, masks: torch.Tensor, position_masks: dict[tuple[int, int], torch.Tensor] | None = None,
                 batch: int | None = None, length: int | None = None) -> Plan:
    """Compile circuits into a :class:`Plan`.

    ``masks`` is bool ``[C, n_sources, n_destinations]``; ``position_masks`` maps an edge
    ``(source, destination)`` to a bool ``[B, P]`` telling at which positions it is in the
    circuit (one circuit only; ``masks`` must be False for those edges).
    """
    legal = engine.graph.legal.to(masks.device)
    masks = masks.to(torch.bool) & legal
    C = masks.shape[0]
    if position_masks and C != 1:
        raise ValueError("position-restricted circuits are evaluated one at a time")
    pos_by_dst: dict[int, list] = {}
    for (s, d), pm in (position_masks or {}).items():
        pos_by_dst.setdefault(d, []).append((s, pm))
    raw = []  # per destination block: (from_ablated, from_patched, custom, global rows, coef, up, positional)
    needed = [set() for _ in engine.src_blocks]
    for d0, d1 in engine.dst_blocks:
        n = d1 - d0
        n_up = int(engine.graph.n_upstream[d0])
        m = masks[:, :n_up, d0:d1].to(engine.w.W_U.dtype)  # [C, S, n]
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
            b = engine.source_block_of(r)
            needed[b].add(r - engine.src_blocks[b].start)
        if positional:
            coef = coef_full[rows][:, custom]
        else:
            coef = coef_full[:, rows][:, :, custom]
        raw.append((from_a, from_r, custom, rows, coef, use_r[:, custom].T.to(engine.w.W_U.dtype), positional))
    plan = Plan(C, needed=[torch.tensor(sorted(x), dtype=torch.long) for x in needed])
    buffer_row = {}  # global source index -> row of the delta buffer (sources in topological order)
    for b, rows_b in enumerate(plan.needed):
        plan.offsets.append(len(buffer_row))
        for r in rows_b.tolist():
            buffer_row[engine.src_blocks[b].start + r] = len(buffer_row)
    plan.n_rows = len(buffer_row)
    plan.buffer_sources = torch.tensor(list(buffer_row), dtype=torch.long, device=masks.device)
    for bi, (from_a, from_r, custom, rows, coef, up, positional) in enumerate(raw):
        if not len(custom):
            plan.blocks.append(BlockPlan(from_a, from_r, custom, 0, None, None, None, positional))
            continue
        n_up = int(engine.graph.n_upstream[engine.dst_blocks[bi][0]])
        prefix = sum(1 for r in buffer_row if r < n_up)
        pos = torch.tensor([buffer_row[r] for r in rows.tolist()], dtype=torch.long)
        gather = None
        if not len(pos):  # custom only because circuits disagree on the base; nothing to mix
            coef = None
        elif len(pos) < prefix / 4:  # sparse: gather the few rows; dense: read the prefix with zero rows (a row copy costs about a matmul row)
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
