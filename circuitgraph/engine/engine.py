"""The patching engine: a model in per-head form, run plainly or with edges patched.

See :mod:`circuitgraph.engine.plan` for how circuits compile,
:mod:`circuitgraph.engine.patched_run` for the patched pass and :mod:`circuitgraph.engine.node_runs` for
runs that compute only a sparse circuit's nodes; every run is made of the one block in
:mod:`circuitgraph.engine.kernel` (node runs call its per-node pieces).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from circuitgraph.engine.ablation import Ablation, PrefixState, clean_states, make_ablation
from circuitgraph.engine.hooks import Tap, names_matching, neuron_hooks
from circuitgraph.engine.kernel import Kernel
from circuitgraph.engine.one_circuit import OneCircuitRun, compile_one_circuit
from circuitgraph.engine.patched_run import PatchedRun
from circuitgraph.engine.plan import Plan, SourceBlock, compile_plan
from circuitgraph.graph import Graph

if TYPE_CHECKING:  # the per-head form is the model layer's; the engine only reads it
    from circuitgraph.model.weights import Weights


class PatchEngine:
    """Runs a model in the canonical per-head form, plainly or with edges patched."""

    def __init__(self, weights: Weights, graph: Graph):
        self.w = weights
        self.graph = graph
        self.kernel = Kernel(weights)
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
        self._workspace: dict[str, torch.Tensor] = {}

    def workspace(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised ``shape`` tensor for a patched run's buffer ``name``.  On a CPU the last one
        of each name is kept and reused while it is large enough: a fresh buffer of this size can
        spend as long in page faults as the work done in it (other devices' allocators cache memory).
        One patched run at a time per engine; :meth:`release_workspace` frees them."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        n = int(torch.Size(shape).numel())
        ws = self._workspace.get(name)
        if ws is None or ws.numel() < n or ws.dtype != like.dtype:
            self._workspace.pop(name, None)
            ws = self._workspace[name] = like.new_empty(n)
        return ws[:n].view(shape)

    def release_workspace(self) -> None:
        """Free the buffers kept between patched runs (the largest is one run's delta buffer)."""
        self._workspace.clear()

    def source_block_of(self, source: int) -> int:
        """Index of the source block (input, a layer's heads, an MLP) that holds global source ``source``."""
        if source == 0:
            return 0
        layer, within = divmod(source - 1, self.H + 1)
        return 1 + 2 * layer + (1 if within == self.H else 0)

    def run(self, tokens: torch.Tensor, record: bool = False, logit_positions: torch.Tensor | None = None):
        """Plain forward.  Returns ``(logits, outputs)``; ``outputs`` (per source block) when ``record``
        (attention patterns and other activations: :meth:`run_with_cache`)."""
        k = self.kernel
        resid = self.w.embed(tokens)
        rope = k.rotary(tokens.shape[1], resid)
        outputs = [resid[None]] if record else None
        all_heads = torch.arange(self.H)
        for layer in range(len(self.w.layers)):
            out = k.block(layer, resid, rope[layer])
            if record:
                home = outputs[0].device
                outputs += [k.head_outputs(layer, out.z, all_heads, out.inv).to(home), out.mlp[None].to(home)]
            resid = out.resid
        return k.unembed(resid, logit_positions), outputs

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks=(), logit_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a plain forward with hooks on named activations (:mod:`circuitgraph.engine.hooks`)."""
        k = self.kernel
        tap = Tap(list(fwd_hooks))
        with neuron_hooks(self.w, tap):
            resid = tap("hook_embed", self.w.embed(tokens))
            rope = k.rotary(tokens.shape[1], resid)
            for layer in range(len(self.w.layers)):
                resid = k.block(layer, resid, rope[layer], tap=tap).resid
            if logit_positions is not None:
                resid = resid[torch.arange(resid.shape[0], device=resid.device), logit_positions]
            return self.w.unembed(tap("ln_final.hook_in", resid))

    def run_with_cache(self, tokens: torch.Tensor, names_filter=None, logit_positions: torch.Tensor | None = None):
        """``(logits, {name: activation})`` of a plain forward, for the names ``names_filter`` selects."""
        cache: dict[str, torch.Tensor] = {}

        def keep(x, hook):
            cache[hook.name] = x

        logits = self.run_with_hooks(tokens, [(n, keep) for n in names_matching(self.w, names_filter)], logit_positions)
        return logits, cache

    def make_ablation(self, outputs: list[torch.Tensor] | None, kind: str) -> Ablation:
        """Ablated source outputs cumulated into the residual each destination block reads.

        ``kind`` (``corrupted``, ``mean``, ``zero``, ``clean``) names what ``outputs`` hold, for the
        reader of the call; the outputs alone decide the ablation (``None``: zero)."""
        return make_ablation(self.w, outputs)

    def clean_states(self, outputs: list[torch.Tensor], ablation: Ablation) -> list[PrefixState]:
        """Prefix states at every layer (and after the last) of the full circuit, read off the plain run
        that recorded ``outputs`` (no patched run needed)."""
        return clean_states(self.w, outputs, ablation)

    def compile(self, masks: torch.Tensor, position_masks: dict[tuple[int, int], torch.Tensor] | None = None,
                batch: int | None = None, length: int | None = None) -> Plan:
        """Compile circuits (bool ``[C, n_sources, n_destinations]``) into a :class:`Plan` (one circuit: with the
        one-circuit executor's products, :func:`~circuitgraph.engine.one_circuit.compile_one_circuit`)."""
        return compile_one_circuit(compile_plan(self, masks, position_masks, batch, length))

    def patched_run(self, tokens: torch.Tensor, ablation: Ablation, plan: Plan,
                    logit_positions: torch.Tensor | None = None, start: PrefixState | None = None,
                    stop_layer: int | None = None):
        """Logits of the clean ``tokens`` with every edge outside the plan's circuits ablated.

        Returns ``[C, B, vocab]`` (at ``logit_positions``) or ``[C, B, P, vocab]``.  With ``start`` it
        resumes from a :class:`PrefixState` (the plan must agree with it before its layer); with
        ``stop_layer``, the same as :meth:`pause`.
        """
        if stop_layer is not None:
            return self.pause(tokens, ablation, plan, stop_layer, start)
        return _executor(plan)(self, tokens, ablation, plan, logit_positions, start).run()

    def pause(self, tokens: torch.Tensor, ablation: Ablation, plan: Plan, layer: int,
              start: PrefixState | None = None) -> PrefixState:
        """The patched run of one circuit stopped at the start of ``layer`` (``n_layers``: after the last
        one, every source's delta), carried on from ``start`` when given: what runs that differ from
        the circuit only from that layer on resume from."""
        return _executor(plan)(self, tokens, ablation, plan, None, start, layer).run()


def _executor(plan: Plan) -> type[PatchedRun]:
    """The run that executes ``plan``: :class:`OneCircuitRun` for one circuit, the stacked reference otherwise."""
    return OneCircuitRun if plan.n_circuits == 1 else PatchedRun
