"""Scores of a circuit: faithfulness (sufficiency), necessity, per-edge and per-node effects.

``faithfulness = (M(circuit) - M(ablated)) / (M(clean) - M(ablated))`` where ``M(ablated)`` is
the metric with every edge ablated (the corrupted run under corrupted ablation);
``necessity = 1 - (M(complement) - M(ablated)) / (M(clean) - M(ablated))``.  Spreads are
bootstrap standard errors over examples (the ratio of means has no closed form).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitgraph.data.dataset import DataError, TaskData
from circuitgraph.engine import Ablation
from circuitgraph.evaluate import distributed as dist
from circuitgraph.evaluate.metrics import get_metric
from circuitgraph.model.loading import CircuitModel
from circuitgraph.spec.circuit_spec import CircuitSpec, ResolvedCircuit

ABLATIONS = ("corrupted", "mean", "zero")


@dataclass
class CircuitScore:
    metric: str
    ablation: str
    n_examples: int
    n_edges: int
    n_edges_total: int
    clean_metric: float
    corrupted_metric: float
    circuit_metric: float
    complement_metric: float
    faithfulness: float
    faithfulness_se: float
    necessity: float
    necessity_se: float
    clean_metric_se: float = 0.0
    corrupted_metric_se: float = 0.0
    circuit_metric_se: float = 0.0
    prepend_bos: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_se(fn, *arrays: np.ndarray, n: int = 1000, seed: int = 0) -> float:
    """Standard error of ``fn(*arrays)`` by resampling examples (rows) with replacement."""
    N = len(arrays[0])
    if N < 2:
        return float("nan")
    idx = np.random.default_rng(seed).integers(0, N, size=(n, N))
    vals = fn(*(a[idx] for a in arrays))
    return float(np.nanstd(vals, ddof=1))


def _normalised(m, clean, base):
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero gap is reported by a warning, and gives nan/inf
        return (m.mean(-1) - base.mean(-1)) / (clean.mean(-1) - base.mean(-1))


class Evaluator:
    """Scores circuits on one dataset, reusing the clean and ablation runs across circuits.

    Under ``torch.distributed`` (see :mod:`circuitgraph.evaluate.distributed`) each rank runs its
    share of the batches and the per-example values are summed over ranks, so every rank returns
    what one process would; ``distributed=False`` keeps a rank to the whole dataset."""

    def __init__(self, model: CircuitModel, data: TaskData, metric: str = "logit_diff", ablation: str = "corrupted",
                 batch_size: int = 32, reference: TaskData | None = None, progress: bool = True,
                 cache_budget_mb: float = 2048, distributed: bool = True):
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation '{ablation}'; expected one of {', '.join(ABLATIONS)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model, self.data, self.ablation_kind = model, data, ablation
        self.metric_name, self.metric = metric, get_metric(metric)
        self.batch_size = batch_size
        self.distributed = distributed and dist.active()
        self.progress = progress and (not self.distributed or dist.is_main())
        self.engine = model.engine
        self.graph = model.graph
        self._mean = self._mean_outputs(reference if reference is not None else data) if ablation == "mean" else None
        self._cache: dict[int, tuple] = {}
        per_example = len(self.graph.sources) * data.clean.shape[1] * self.engine.D * 4 / 2**20
        self._cache_ok = ablation == "corrupted" and per_example * len(data) <= cache_budget_mb
        self.clean_values, self.base_values = self._baselines()

    @property
    def circuits_per_pass(self) -> int:
        """How many circuits share one patched pass.  Stacking circuits saves per-operation overhead
        (small models, GPUs) but not arithmetic, so on a CPU a large model runs them one by one."""
        work = self.engine.D * min(self.batch_size, len(self.data)) * self.data.clean.shape[1]
        return 16 if self.model.device.type != "cpu" or work <= 2**21 else 1

    # ----- runs ----------------------------------------------------------------------------
    def _spans(self, n: int | None = None) -> list[tuple[int, int]]:
        """This rank's mini-batches ``(start, stop)`` of ``n`` examples (default: the dataset)."""
        n = len(self.data) if n is None else n
        if not self.distributed:
            return [(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        return [span for _, span in dist.shard(n, self.batch_size)]

    def reduce(self, x):
        """Sum a tensor or array over ranks (identity in one process); see :mod:`~circuitgraph.evaluate.distributed`."""
        if not self.distributed:
            return x
        return dist.all_sum_array(x) if isinstance(x, np.ndarray) else dist.all_sum(x)

    def _bar(self, it, desc):
        it = list(it)
        return tqdm(it, desc=desc, leave=False, disable=not self.progress or len(it) < 2)

    @torch.no_grad()
    def _mean_outputs(self, ref: TaskData) -> list[torch.Tensor]:
        """Each source's output averaged over ``ref`` (per position when all examples share a length)."""
        aligned = ref.same_length and ref.clean.shape[1] == self.data.clean.shape[1] and self.data.same_length
        P, dev = ref.clean.shape[1], self.model.device
        # sums in fp32 whatever the model's dtype (a bf16 sum of many examples loses digits)
        sums = [torch.zeros(b.stop - b.start, 1, P if aligned else 1, self.engine.D, device=dev)
                for b in self.engine.src_blocks]
        count = torch.zeros(1, P, 1, device=dev) if aligned else torch.zeros((), device=dev)
        dtype = None
        for a, b in self._bar(self._spans(len(ref)), "mean ablation"):
            part = ref.slice(a, b)
            _, outs = self.engine.run(part.corrupted.to(dev), record=True)
            dtype = outs[0].dtype
            valid = (torch.arange(part.clean.shape[1])[None] < part.lengths[:, None]).float().to(outs[0].device)  # [B, P]
            for s, o in zip(sums, outs):
                s += (o.float() * valid[None, :, :, None]).sum((1,) if aligned else (1, 2), keepdim=True)
            count += valid.sum(0, keepdim=True)[..., None] if aligned else valid.sum()
        sums, count = [self.reduce(s) for s in sums], self.reduce(count)
        dtype = dtype or self.engine.w.W_U.dtype
        return [(s / count).to(dtype) for s in sums]

    @torch.no_grad()
    def _batch(self, i: int, a: int, b: int):
        """(data slice, ablation, clean last-position logits) of one mini-batch."""
        if i in self._cache:
            return self._cache[i]
        part = self.data.slice(a, b)
        dev = self.model.device
        clean_logits, _ = self.engine.run(part.clean.to(dev), logit_positions=part.last.to(dev))
        self.model.verify(part.clean, part.last, clean_logits)
        if self.ablation_kind == "corrupted":
            _, outs = self.engine.run(part.corrupted.to(dev), record=True)
            abl = self.engine.make_ablation(outs, "corrupted")
        elif self.ablation_kind == "mean":
            abl = self.engine.make_ablation(self._mean, "mean")
        else:
            abl = self.engine.make_ablation(None, "zero")
        out = (part, abl, clean_logits)
        if self._cache_ok:
            self._cache[i] = out
        return out

    def _values(self, logits, part, clean_logits):
        return self.metric(logits, _on(part, logits.device), clean_logits).double().cpu()

    @torch.no_grad()
    def _baselines(self):
        out = np.zeros((2, len(self.data)))
        for i, (a, b) in enumerate(self._bar(self._spans(), "clean/ablated runs")):
            part, abl, clean_logits = self._batch(i, a, b)
            out[0, a:b] = self._values(clean_logits, part, clean_logits).numpy()
            last = part.last.to(clean_logits.device)
            final = abl.resid[-1].expand(len(part), part.clean.shape[1], -1)
            empty = self.engine.w.unembed(final[torch.arange(len(part)), last])
            out[1, a:b] = self._values(empty, part, clean_logits).numpy()
        out = self.reduce(out)
        return out[0], out[1]

    @torch.no_grad()
    def metric_values(self, circuits: list[ResolvedCircuit], complement: bool = False, chunk: int | None = None,
                      desc: str | None = None) -> np.ndarray:
        """Per-example metric ``[C, N]`` with each circuit (or its complement) patched in.

        Circuits without positions go through :meth:`mask_values` together; position-restricted
        ones need per-example position masks and run one at a time."""
        out = np.zeros((len(circuits), len(self.data)), dtype=np.float64)
        plain = [i for i, c in enumerate(circuits) if not c.position_names]
        if plain:
            masks = torch.stack([circuits[i].mask() for i in plain])
            out[plain] = self.mask_values(self.graph.legal[None] & ~masks if complement else masks, chunk, desc)
        positional = [i for i, c in enumerate(circuits) if c.position_names]
        if positional:
            part_out = np.zeros((len(positional), len(self.data)))
            for j, i in enumerate(tqdm(positional, desc=desc or "patched runs", leave=False,
                                       disable=not self.progress or len(positional) < 2)):
                for s, (a, b) in enumerate(self._spans()):
                    part, abl, clean_logits = self._batch(s, a, b)
                    logits = self._patched(part, abl, circuits[i], complement)
                    part_out[j, a:b] = self._values(logits, part, clean_logits[None]).numpy()[0]
            out[positional] = self.reduce(part_out)
        return out

    @torch.no_grad()
    def mask_values(self, masks: torch.Tensor, chunk: int | None = None, desc: str | None = None) -> np.ndarray:
        """Per-example metric ``[C, N]`` for circuits given directly as bool ``[C, n_sources, n_destinations]``
        edge masks (fast for many large circuits, e.g. "everything but these edges")."""
        chunk = chunk or self.circuits_per_pass
        out = np.zeros((masks.shape[0], len(self.data)), dtype=np.float64)
        spans = self._spans()
        jobs = [(c, s) for c in range(0, masks.shape[0], chunk) for s in range(len(spans))]
        for c, s in tqdm(jobs, desc=desc or "patched runs", leave=False, disable=not self.progress or len(jobs) < 2):
            a, b = spans[s]
            part, abl, clean_logits = self._batch(s, a, b)
            m = masks[c:c + chunk]
            plan = self.engine.compile(m.to(self.model.device))
            logits = self.engine.patched_run(part.clean.to(self.model.device), abl, plan, logit_positions=part.last.to(self.model.device))
            out[c:c + len(m), a:b] = self._values(logits, part, clean_logits.expand(len(m), -1, -1)).numpy()
        return self.reduce(out)

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """Per-circuit normalised score ``(M - M_ablated) / (M_clean - M_ablated)`` of ``[C, N]`` metric values."""
        return _normalised(values, self.clean_values[None], self.base_values[None])

    def _patched(self, part: TaskData, abl: Ablation, circuit: ResolvedCircuit, complement: bool):
        """Logits ``[1, B, vocab]`` of one position-restricted circuit (or its complement)."""
        dev = self.model.device
        masks = circuit.mask()[None]
        pos_masks = {}
        for (s, d), names in circuit.edges.items():
            if names is not None:
                pm = part.position_mask(names)
                pos_masks[(s, d)] = ~pm if complement else pm
                if complement:
                    masks[0, s, d] = True  # excluded below, then set per position
        if complement:
            masks = self.graph.legal[None] & ~masks
        plan = self.engine.compile(masks.to(dev), {k: v.to(dev) for k, v in pos_masks.items()} if pos_masks else None,
                                   batch=len(part), length=part.clean.shape[1])
        return self.engine.patched_run(part.clean.to(dev), abl, plan, logit_positions=part.last.to(dev))

    # ----- scores --------------------------------------------------------------------------
    def resolve(self, circuit: CircuitSpec | ResolvedCircuit) -> ResolvedCircuit:
        if isinstance(circuit, CircuitSpec):
            circuit = circuit.resolve(self.graph)
        for name in circuit.position_names:
            if name not in self.data.positions:
                raise DataError(f"the circuit uses position '{name}', which the dataset does not name "
                                f"(it names: {', '.join(sorted(self.data.positions)) or 'none'})")
        return circuit

    def evaluate(self, circuit: CircuitSpec | ResolvedCircuit) -> CircuitScore:
        """Faithfulness and necessity of one circuit, with bootstrap standard errors."""
        circuit = self.resolve(circuit)
        m_circ = self.metric_values([circuit])[0]
        m_comp = self.metric_values([circuit], complement=True)[0]
        clean, base = self.clean_values, self.base_values
        faith = float(_normalised(m_circ, clean, base))
        nec = 1.0 - float(_normalised(m_comp, clean, base))
        notes = self._check_gap()
        sem = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
        return CircuitScore(
            metric=self.metric_name, ablation=self.ablation_kind, n_examples=len(self.data),
            n_edges=len(circuit), n_edges_total=self.graph.n_edges,
            clean_metric=float(clean.mean()), corrupted_metric=float(base.mean()),
            circuit_metric=float(m_circ.mean()), complement_metric=float(m_comp.mean()),
            faithfulness=faith, faithfulness_se=bootstrap_se(_normalised, m_circ, clean, base),
            necessity=nec, necessity_se=bootstrap_se(lambda *a: 1 - _normalised(*a), m_comp, clean, base),
            clean_metric_se=sem(clean), corrupted_metric_se=sem(base), circuit_metric_se=sem(m_circ),
            prepend_bos=self.data.prepend_bos, warnings=notes)

    def _check_gap(self) -> list[str]:
        clean, base = self.clean_values, self.base_values
        gap = float(clean.mean() - base.mean())
        se = bootstrap_se(lambda c, b: c.mean(-1) - b.mean(-1), clean, base)
        if not math.isfinite(se) or abs(gap) <= 2 * se or abs(gap) < 1e-6:
            msg = (f"clean ({clean.mean():.4g}) and ablated ({base.mean():.4g}) {self.metric_name} differ by {gap:.3g} "
                   f"(standard error {se:.2g}); normalised scores are not meaningful")
            warnings.warn(msg, stacklevel=3)
            return [msg]
        return []

    def faithfulness_of(self, circuits: list[ResolvedCircuit], desc: str | None = None) -> np.ndarray:
        """Faithfulness of many circuits (batched)."""
        vals = self.metric_values(circuits, desc=desc)
        return _normalised(vals, self.clean_values[None], self.base_values[None])

    def edge_effects(self, circuit: CircuitSpec | ResolvedCircuit, chunk: int | None = None) -> dict[str, tuple[float, float]]:
        """Drop in faithfulness when each edge alone is removed from the circuit: ``{edge: (drop, se)}``."""
        circuit = self.resolve(circuit)
        keys = list(circuit.edges)
        return self._drops(circuit, [[k] for k in keys], circuit.edge_names, chunk, "edge effects")

    def node_effects(self, circuit: CircuitSpec | ResolvedCircuit, chunk: int | None = None) -> dict[str, tuple[float, float]]:
        """Drop in faithfulness when every edge into or out of a node is removed."""
        circuit = self.resolve(circuit)
        g = self.graph
        by_node: dict[str, list] = {}
        for s, d in circuit.edges:
            for node in (g.sources[s], g.node_of(g.destinations[d])):
                if node not in ("input", "logits"):
                    by_node.setdefault(node, []).append((s, d))
        return self._drops(circuit, list(by_node.values()), list(by_node), chunk, "node effects")

    def _drops(self, circuit, removals, names, chunk, desc):
        full = self.metric_values([circuit])[0]
        reduced = self.metric_values([circuit.without(r) for r in removals], chunk=chunk, desc=desc)
        clean, base = self.clean_values, self.base_values
        drop = lambda f, r, c, b: _normalised(f, c, b) - _normalised(r, c, b)
        out = {}
        for name, row in zip(names, reduced):
            out[name] = (float(drop(full, row, clean, base)), bootstrap_se(drop, full, row, clean, base))
        return out


def _on(part: TaskData, device) -> TaskData:
    if part.answers.device == device:
        return part
    return TaskData(part.clean, part.corrupted, part.lengths, part.answers.to(device), part.wrongs.to(device),
                    part.positions, part.examples, part.prepend_bos)


def evaluate(model: CircuitModel, data: TaskData, circuit: CircuitSpec, **kw) -> CircuitScore:
    """One-call scoring of a circuit (see :class:`Evaluator` for the options)."""
    return Evaluator(model, data, **kw).evaluate(circuit)
