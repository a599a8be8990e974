"""Scores of a circuit: faithfulness (sufficiency), necessity, per-edge and per-node effects.

``faithfulness = (M(circuit) - M(ablated)) / (M(clean) - M(ablated))`` where ``M(ablated)`` is
the metric with every edge ablated (the corrupted run under corrupted ablation);
``necessity = 1 - (M(complement) - M(ablated)) / (M(clean) - M(ablated))``.  Spreads are
bootstrap standard errors over examples (the ratio of means has no closed form).

When ``M(clean)`` and ``M(ablated)`` are equal within noise the ratios mean nothing: they are
reported as ``None`` with the reason (:func:`normalisation_problem`), never as a number; so is a
standard error from one example.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitgraph.data.dataset import REST, DataError, TaskData, load_dataset, model_limits
from circuitgraph.engine import Ablation
from circuitgraph.engine.removal import RemovalRuns
from circuitgraph.errors import CircuitWarning
from circuitgraph.evaluate import distributed as dist
from circuitgraph.evaluate.metrics import get_metric
from circuitgraph.graph.nodes import NodeRef
from circuitgraph.model.loading import CircuitModel
from circuitgraph.spec.circuit_spec import CircuitSpec, ResolvedCircuit, SpecError

ABLATIONS = ("corrupted", "mean", "zero")
MEMO_CIRCUITS = 8  # circuits whose per-example values an Evaluator keeps (circuit_values)


@dataclass
class CircuitScore:
    """Faithfulness and necessity of one circuit.  A ratio whose denominator is zero or within noise
    is ``None`` with the reason in ``undefined_reason``; a standard error from one example is ``None``
    with ``se_reason``.  :meth:`to_dict` and :meth:`to_json` never hold NaN or Infinity."""

    metric: str
    ablation: str
    n_examples: int
    n_edges: int
    n_edges_total: int
    clean_metric: float
    corrupted_metric: float
    circuit_metric: float
    complement_metric: float
    faithfulness: float | None
    faithfulness_se: float | None
    necessity: float | None
    necessity_se: float | None
    clean_metric_se: float | None = None
    corrupted_metric_se: float | None = None
    circuit_metric_se: float | None = None
    prepend_bos: bool = False
    warnings: list[str] = field(default_factory=list)
    undefined_reason: str | None = None
    se_reason: str | None = None
    model: str | None = None
    quantization: str | None = None  # e.g. "Q4_1 (GGUF, dequantized to float32)"; None: weights as stored

    def to_dict(self) -> dict:
        """JSON-ready: every non-finite number becomes ``None`` (strict JSON has no NaN)."""
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}

    def to_json(self, **kw) -> str:
        """The score as one JSON object; undefined numbers are ``null`` (never NaN)."""
        return json.dumps(self.to_dict(), allow_nan=False, **kw)


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def bootstrap_se(fn, *arrays: np.ndarray, n: int = 1000, seed: int = 0) -> float:
    """Standard error of ``fn(*arrays)`` by resampling examples (rows) with replacement (NaN for one example)."""
    N = len(arrays[0])
    if N < 2:
        return float("nan")
    idx = np.random.default_rng(seed).integers(0, N, size=(n, N))
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = fn(*(a[idx] for a in arrays))
    return float(np.nanstd(vals, ddof=1))


def normalised(m, clean, base):
    """``(m - base) / (clean - base)`` of the means over examples: 1 = the clean behaviour, 0 = the ablated one."""
    with np.errstate(divide="ignore", invalid="ignore"):  # an undefined normalisation is reported, not printed
        return (m.mean(-1) - base.mean(-1)) / (clean.mean(-1) - base.mean(-1))


def zero_gap(clean: np.ndarray, base: np.ndarray) -> bool:
    """Clean and ablated metrics equal up to float rounding (relative 1e-6): every ratio is 0/0."""
    c, b = float(clean.mean()), float(base.mean())
    return abs(c - b) <= 1e-6 * max(1.0, abs(c), abs(b))


def normalisation_problem(clean: np.ndarray, base: np.ndarray, metric: str) -> str | None:
    """Why ``(M - M_ablated) / (M_clean - M_ablated)`` means nothing on this data, or ``None``.

    Undefined when the clean and ablated metrics are equal (relative 1e-6) or, with two or more
    examples, differ by no more than twice the bootstrap standard error of their difference."""
    c, b = float(clean.mean()), float(base.mean())
    if not (math.isfinite(c) and math.isfinite(b)):
        return f"the clean ({c:.4g}) or ablated ({b:.4g}) {metric} is not finite"
    gap = c - b
    if zero_gap(clean, base):
        return (f"clean and ablated {metric} are equal ({c:.4g}), so faithfulness and necessity divide by zero; "
                f"check that the corrupted prompts change the answer")
    se = bootstrap_se(lambda x, y: x.mean(-1) - y.mean(-1), clean, base)
    if math.isfinite(se) and abs(gap) <= 2 * se:
        return (f"clean ({c:.4g}) and ablated ({b:.4g}) {metric} differ by {gap:.3g}, within twice its standard error "
                f"({se:.2g}), so faithfulness and necessity would divide by noise")
    return None


AUTO_BUDGET_SHARE = 0.5  # without --memory-budget, passes hold at most this share of the free memory (the rest: activations)


def free_mb(device: torch.device) -> float:
    """MiB still free on ``device``: a GPU's free memory, or the RAM Linux reports available (inf where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
    return math.inf


class Evaluator:
    """Scores circuits on one dataset, reusing the clean and ablation runs across circuits.

    Under ``torch.distributed`` (see :mod:`circuitgraph.evaluate.distributed`) each rank runs its
    share of the batches and the per-example values are summed over ranks, so every rank returns
    what one process would; ``distributed=False`` keeps a rank to the whole dataset."""

    def __init__(self, model: CircuitModel, data: TaskData, metric: str = "logit_diff", ablation: str = "corrupted",
                 batch_size: int = 32, reference: TaskData | None = None, progress: bool = True,
                 cache_budget_mb: float = 2048, distributed: bool = True, memory_budget_mb: float | None = None):
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation '{ablation}'; expected one of {', '.join(ABLATIONS)}")
        model, data = _check_inputs(model, data)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.data, self.ablation_kind = model, data, ablation
        self.metric_name, self.metric = metric, get_metric(metric)
        self.distributed = distributed and dist.active()
        self.progress = progress and (not self.distributed or dist.is_main())
        self.engine = model.engine
        self.graph = model.graph
        self.memory_budget_mb = memory_budget_mb
        # without a budget, a share of what the device has free, so that a large model's default batch
        # shrinks to fit rather than failing out of memory (the results are the same either way)
        self._limit_mb = memory_budget_mb if memory_budget_mb is not None else AUTO_BUDGET_SHARE * free_mb(model.device)
        if self.distributed:  # every rank must cut the same batches and passes
            self._limit_mb = dist.all_min(self._limit_mb)
        if memory_budget_mb is not None:
            self.batch_size = self._batch_within(memory_budget_mb, batch_size)
        elif math.isfinite(self._limit_mb):
            self.batch_size = max(1, min(batch_size, int(self._limit_mb // self.pass_mb(1))))
        else:
            self.batch_size = batch_size
        self._mean = self._mean_outputs(reference if reference is not None else data) if ablation == "mean" else None
        self._cache: dict[int, tuple] = {}
        self._circuit_memo: OrderedDict = OrderedDict()  # circuit_values of the last few circuits
        cached = self.pass_mb(len(data), circuits=0)  # every batch's ablated run
        # kept beside one pass of the circuits
        cache_budget_mb = min(cache_budget_mb, self._limit_mb - self.pass_mb(self.batch_size, self.circuits_per_pass)
                              + self.pass_mb(self.batch_size, circuits=0))
        self._cache_ok = ablation == "corrupted" and cached <= cache_budget_mb
        self.clean_values, self.base_values = self._baselines()

    @property
    def circuits_per_pass(self) -> int:
        """How many circuits share one patched pass.  Stacking circuits saves per-operation overhead
        (small models, GPUs) but not arithmetic, and on a CPU a circuit run alone takes a faster path
        (mixing, normalising and projecting a few tokens at a time in cache): there only tiny passes
        stack (d_model x tokens <= 2^15; on GPT-2 small over 16 x 16 tokens, 16 stacked circuits took
        1.46x as long as one by one in ``benchmarks/bench_effects.py``, and 8 random ones 2.0-2.5x).
        No more than fit in the memory budget (without one, in half the free memory)."""
        return self._per_pass(2**15)

    @property
    def trials_per_pass(self) -> int:
        """:attr:`circuits_per_pass` for nearly complete circuits resumed from a prefix state (exact edge
        effects, path patching), which are short and take the stacked path either way: on a CPU, passes up to d_model x tokens = 2^21
        stack (GPT-2 small over 16 x 16: 8 stacked trials took 0.5-0.8x as long as one by one)."""
        return self._per_pass(2**21)

    def _per_pass(self, cpu_work: int) -> int:
        batch = min(self.batch_size, len(self.data))
        work = self.engine.D * batch * self.data.clean.shape[1]
        n = 16 if self.model.device.type != "cpu" or work <= cpu_work else 1
        while n > 1 and self.pass_mb(batch, n) > self._limit_mb:
            n //= 2
        return n

    def pass_mb(self, batch: int, circuits: int = 1) -> float:
        """MiB a patched pass of ``circuits`` stacked circuits over ``batch`` examples holds in the buffers
        that grow with them: the ablated run's source outputs, and per circuit a delta row for every
        source (a dense circuit's worst case) and one layer's head-port inputs.  The model's weights and a
        plain forward's activations come on top; attribution keeps fewer deltas (``keep_deltas``) but
        in float32."""
        n, e = len(self.graph.sources), self.engine
        rows = n + circuits * (n + 2 + 3 * e.H + 1)
        return batch * self.data.clean.shape[1] * e.D * e.w.W_U.element_size() * rows / 2**20

    def _batch_within(self, budget_mb: float, batch_size: int) -> int:
        """The largest batch up to ``batch_size`` whose patched pass of one circuit fits ``budget_mb``."""
        one = self.pass_mb(1)
        if not math.isfinite(budget_mb) or budget_mb < one:
            raise ValueError(f"memory budget of {budget_mb:g} MiB is below what one example's patched pass holds "
                             f"({one:.3g} MiB at {self.data.clean.shape[1]} tokens); raise the budget or shorten the prompts")
        return max(1, min(batch_size, int(budget_mb // one)))

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

    @property
    def n_batches(self) -> int:
        """How many mini-batches the dataset splits into."""
        return len(self._spans())

    def batch(self, i: int):
        """``(data slice, ablation, clean last-position logits)`` of mini-batch ``i`` (cached when it fits)."""
        a, b = self._spans()[i]
        return self._batch(i, a, b)

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
        return self.metric(logits, part.to(logits.device), clean_logits).double().cpu()

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

    def circuit_values(self, circuit: ResolvedCircuit, complement: bool = False) -> np.ndarray:
        """Per-example metric ``[N]`` of one circuit (or its complement), as :meth:`metric_values` gives it.

        The last :data:`MEMO_CIRCUITS` circuits' values are kept, so a circuit's score, its node and edge
        effects and its per-example view (``circuitgraph explore``) run it once."""
        h = hashlib.sha1(circuit.mask().numpy().tobytes())
        h.update(repr(sorted((k, tuple(v)) for k, v in circuit.edges.items() if v is not None)).encode())
        key = (h.hexdigest(), complement)
        if key in self._circuit_memo:
            self._circuit_memo.move_to_end(key)
        else:
            self._circuit_memo[key] = self.metric_values([circuit], complement=complement)[0]
            while len(self._circuit_memo) > MEMO_CIRCUITS:
                self._circuit_memo.popitem(last=False)
        return self._circuit_memo[key].copy()

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """Per-circuit normalised score ``(M - M_ablated) / (M_clean - M_ablated)`` of ``[C, N]`` metric values."""
        return normalised(values, self.clean_values[None], self.base_values[None])

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

    def first_rows(self, n: int) -> "Evaluator":
        """The same evaluator (ablation, mean outputs, batching) on the first ``n`` examples: a cheap
        look before a run on them all (itself when ``n`` covers the dataset)."""
        return self if n >= len(self.data) else self.on_rows(range(n))

    def on_rows(self, idx) -> "Evaluator":
        """The same evaluator (ablation, mean outputs, batching) on rows ``idx`` of its data, repeats allowed
        (a bootstrap resample); mean ablation keeps the means of the data it was made with."""
        sub = copy.copy(self)
        sub.data, sub._cache = self.data.take(idx), {}
        for memo in ("_undefined", "_circuit_memo"):  # per-dataset results: none carry over to the rows
            sub.__dict__.pop(memo, None)
        if hasattr(self, "_circuit_memo"):
            sub._circuit_memo = type(self._circuit_memo)()
        sub.clean_values, sub.base_values = sub._baselines()
        return sub

    # ----- scores --------------------------------------------------------------------------
    def resolve(self, circuit) -> ResolvedCircuit:
        """The circuit as edges of this model: a :class:`CircuitSpec`, a spec or MIB dict, a list of
        edge names, or a bool ``[n_sources, n_destinations]`` mask (see ``graph.sources`` /
        ``graph.destinations``).  Warns (:class:`CircuitWarning`) about specs that could mislead."""
        resolved, notes = self._resolve(circuit)
        for note in notes:
            warnings.warn(note, CircuitWarning, stacklevel=3)
        return resolved

    def _resolve(self, circuit) -> tuple[ResolvedCircuit, list[str]]:
        notes: list[str] = []
        if isinstance(circuit, dict):
            circuit = CircuitSpec.from_dict(circuit)
        elif isinstance(circuit, str):
            circuit = [circuit]
        if isinstance(circuit, (list, tuple, set)) and all(isinstance(e, str) for e in circuit):
            circuit = CircuitSpec(edges=list(dict.fromkeys(circuit)))
            if not circuit.edges:
                raise SpecError("the circuit is an empty list of edges")
        elif isinstance(circuit, (torch.Tensor, np.ndarray)):
            circuit = self._from_mask(torch.as_tensor(circuit))
        if isinstance(circuit, CircuitSpec):
            spec = circuit.require_selection()
            circuit = spec.resolve(self.graph)
            if len(circuit) == 0:
                raise SpecError(f"the spec selects no edge of the model (it holds {spec.contents()})")
            if (other := _other_model(spec.model, self.model.name)) is not None:
                notes.append(f"the spec is for model '{spec.model}' but is evaluated on '{other}'")
            named = [p for p in spec.metadata.get("spans") or [] if p != REST]
            if REST in circuit.position_names and named and set(named) != set(self.data.positions):
                notes.append(f"the spec's '{REST}' positions were every token but {', '.join(named)}; this dataset names "
                             f"{', '.join(sorted(self.data.positions)) or 'none'}, so here they are every token but those")
            if not _connects(circuit):
                notes.append(f"the circuit has no path from input to logits (it holds {spec.contents()}), so it carries "
                             f"no signal from the prompt to the answer; is the spec a fragment?")
        elif isinstance(circuit, ResolvedCircuit):
            if circuit.graph != self.graph:
                raise SpecError(f"the circuit was resolved for another model shape ({circuit.graph.n_layers} layers x "
                                f"{circuit.graph.n_heads} heads, this model has {self.graph.n_layers} x {self.graph.n_heads})")
        else:
            raise TypeError(f"cannot evaluate a {type(circuit).__name__}; expected a CircuitSpec, a spec dict, a list of "
                            f"edge names ('a0.h1->a1.h2<k>') or a bool mask [n_sources, n_destinations]")
        self.data.check_positions(circuit.position_names)
        return circuit, notes

    def _from_mask(self, mask: torch.Tensor) -> ResolvedCircuit:
        shape = tuple(self.graph.legal.shape)
        if tuple(mask.shape) != shape:
            raise SpecError(f"an edge mask must have shape {list(shape)} (graph.sources x graph.destinations), got {list(mask.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise SpecError("an edge mask must be boolean (or 0/1)")
            mask = mask.bool()
        bad = mask.cpu() & ~self.graph.legal
        if bad.any():
            s, d = torch.nonzero(bad)[0].tolist()
            raise SpecError(f"the mask selects {int(bad.sum())} pair(s) that are not edges, e.g. "
                            f"'{self.graph.sources[s]}->{self.graph.destinations[d]}'")
        edges = {tuple(sd): None for sd in torch.nonzero(mask.cpu()).tolist()}
        if not edges:
            raise SpecError("the edge mask selects no edge")
        return ResolvedCircuit(self.graph, edges)

    @property
    def undefined_reason(self) -> str | None:
        """Why normalised scores (faithfulness, necessity, effects) mean nothing on this data, or ``None``."""
        if not hasattr(self, "_undefined"):
            self._undefined = normalisation_problem(self.clean_values, self.base_values, self.metric_name)
        return self._undefined

    def evaluate(self, circuit) -> CircuitScore:
        """Faithfulness and necessity of one circuit, with bootstrap standard errors.

        ``circuit`` is anything :meth:`resolve` takes.  When the normalisation is undefined (clean
        and ablated metrics equal within noise) both ratios are ``None`` and ``undefined_reason``
        says why; with one example the standard errors are ``None``."""
        circuit, notes = self._resolve(circuit)
        m_circ = self.circuit_values(circuit)
        m_comp = self.circuit_values(circuit, complement=True)
        clean, base = self.clean_values, self.base_values
        undefined = self.undefined_reason
        one = len(self.data) < 2
        se_reason = "one example: no standard error" if one else None
        if undefined:
            notes.append(f"faithfulness and necessity are undefined: {undefined}")
            faith = nec = faith_se = nec_se = None
        else:
            faith = float(normalised(m_circ, clean, base))
            nec = 1.0 - float(normalised(m_comp, clean, base))
            faith_se = None if one else bootstrap_se(normalised, m_circ, clean, base)
            nec_se = None if one else bootstrap_se(lambda *a: 1 - normalised(*a), m_comp, clean, base)
        for note in notes:
            warnings.warn(note, CircuitWarning, stacklevel=2)
        sem = lambda x: None if one else float(np.std(x, ddof=1) / math.sqrt(len(x)))
        return CircuitScore(
            metric=self.metric_name, ablation=self.ablation_kind, n_examples=len(self.data),
            n_edges=len(circuit), n_edges_total=self.graph.n_edges,
            clean_metric=float(clean.mean()), corrupted_metric=float(base.mean()),
            circuit_metric=float(m_circ.mean()), complement_metric=float(m_comp.mean()),
            faithfulness=faith, faithfulness_se=faith_se, necessity=nec, necessity_se=nec_se,
            clean_metric_se=sem(clean), corrupted_metric_se=sem(base), circuit_metric_se=sem(m_circ),
            prepend_bos=self.data.prepend_bos, warnings=notes, undefined_reason=undefined, se_reason=se_reason,
            model=getattr(self.model, "name", None), quantization=getattr(self.model, "quantization", None))

    def faithfulness_of(self, circuits: list[ResolvedCircuit], desc: str | None = None) -> np.ndarray:
        """Faithfulness of many circuits (batched); NaN or infinite where :attr:`undefined_reason` is set."""
        vals = self.metric_values(circuits, desc=desc)
        return normalised(vals, self.clean_values[None], self.base_values[None])

    def edge_effects(self, circuit: CircuitSpec | ResolvedCircuit, chunk: int | None = None) -> dict[str, tuple[float, float]]:
        """Drop in faithfulness when each edge alone is removed from the circuit: ``{edge: (drop, se)}``."""
        circuit = self.resolve(circuit)
        keys = list(circuit.edges)
        return self._drops(circuit, [[k] for k in keys], circuit.edge_names, chunk, "edge effects")

    def node_effects(self, circuit: CircuitSpec | ResolvedCircuit, chunk: int | None = None) -> dict[str, tuple[float, float]]:
        """Drop in faithfulness when every edge into or out of a node is removed."""
        circuit = self.resolve(circuit)
        by_node = self._node_removals(circuit)
        return self._drops(circuit, list(by_node.values()), list(by_node), chunk, "node effects")

    def effects(self, circuit: CircuitSpec | ResolvedCircuit, edges: bool = True,
                chunk: int | None = None) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
        """``(node_effects, edge_effects)`` of one circuit (``edge_effects`` empty with ``edges=False``): the
        same numbers as the two methods give, from one set of runs (the circuit's own run, paused once per
        layer and batch, serves both)."""
        circuit = self.resolve(circuit)
        by_node = self._node_removals(circuit)
        removals, names = list(by_node.values()), list(by_node)
        if edges:
            removals += [[k] for k in circuit.edges]
            names += circuit.edge_names
        drops = self._drops(circuit, removals, names, chunk, "node and edge effects", keyed=False)
        n = len(by_node)
        return dict(zip(names[:n], drops[:n])), dict(zip(names[n:], drops[n:]))

    def _node_removals(self, circuit: ResolvedCircuit) -> dict[str, list]:
        """Every node of the circuit but input and logits, with the circuit's edges into or out of it."""
        g = self.graph
        by_node: dict[str, list] = {}
        for s, d in circuit.edges:
            for node in (g.sources[s], g.node_of(g.destinations[d])):
                if node not in ("input", "logits"):
                    by_node.setdefault(node, []).append((s, d))
        return by_node

    def _drops(self, circuit, removals, names, chunk, desc, keyed: bool = True):
        if self.undefined_reason:
            warnings.warn(f"effects are undefined (NaN): {self.undefined_reason}", CircuitWarning, stacklevel=3)
        full = self.circuit_values(circuit)
        reduced = self.values_without(circuit.mask(), removals, chunk, desc,
                                      position_edges={k: v for k, v in circuit.edges.items() if v is not None})
        clean, base = self.clean_values, self.base_values
        drop = lambda f, r, c, b: normalised(f, c, b) - normalised(r, c, b)
        out = [(float(drop(full, row, clean, base)), bootstrap_se(drop, full, row, clean, base)) for row in reduced]
        return dict(zip(names, out)) if keyed else out

    @torch.no_grad()
    def values_without(self, mask: torch.Tensor, removals: list, chunk: int | None = None, desc: str | None = None,
                       positions: list[str] | None = None, position_edges: dict | None = None) -> np.ndarray:
        """Per-example metric ``[R, N]`` of a circuit without each removal (a list of its ``(source,
        destination)`` edges; with ``positions``, removed at those named positions only, as path
        patching does).  The circuit is ``mask`` (bool ``[n_sources, n_destinations]``, edges at every
        position) plus ``position_edges`` (``{edge: position names}``, edges at those positions only).

        Nothing before the first layer a removal changes can differ from the circuit's own run, so
        each removal resumes from that run paused there (paused at each such layer in turn, once per batch),
        ``chunk`` at a time (default :attr:`circuits_per_pass`: on GPT-2 small over 16 x 16 tokens,
        resumed removals from MIB's IOI circuit ran 1.14-1.19x faster one by one than 16 stacked; nearly
        complete circuits, as in path patching, stack better: see :attr:`trials_per_pass`).  With
        positions the removals run one at a time, their plans built per batch from its positions.  Removals
        of the same edges (a node with one edge, and that edge) run once."""
        first = {}  # a removal's edges -> the first removal of them
        same = [first.setdefault(frozenset(map(tuple, r)), i) for i, r in enumerate(removals)]
        if len(first) < len(removals):
            unique = list(first.values())
            vals = self.values_without(mask, [removals[i] for i in unique], chunk, desc, positions, position_edges)
            row = {i: j for j, i in enumerate(unique)}
            return vals[[row[i] for i in same]]
        G, e, dev = self.graph, self.engine, self.model.device
        position_edges = position_edges or {}
        positional = bool(positions) or bool(position_edges)
        if not positional and dev.type == "cpu" and RemovalRuns.applies(e):
            return self._values_recomputing_changed(mask, removals, desc)
        dst_layer = [NodeRef.parse(d).block_layer(G.n_layers) for d in G.destinations]
        by_layer: dict[int, list[int]] = {}
        for i, r in enumerate(removals):
            by_layer.setdefault(min(dst_layer[d] for _, d in r), []).append(i)
        chunk = 1 if positional else chunk or self.circuits_per_pass

        def without(idx: list[int]) -> torch.Tensor:
            masks = mask[None].repeat(len(idx), 1, 1)
            for j, i in enumerate(idx):
                for src, dst in removals[i]:
                    masks[j, src, dst] = False
            return masks.to(dev)

        chunks = {layer: [todo[c:c + chunk] for c in range(0, len(todo), chunk)] for layer, todo in by_layer.items()}
        plans = {} if positional else {tuple(idx): e.compile(without(idx)) for cs in chunks.values() for idx in cs}
        plain = None if position_edges else e.compile(mask[None].to(dev))
        bases = {}  # batch -> (its position masks of the circuit's edges, the circuit's plan)
        out = np.zeros((len(removals), len(self.data)), dtype=np.float64)
        jobs = [(s, layer) for s in range(self.n_batches) for layer in sorted(chunks)]  # a batch's layers in order
        state = None
        for s, layer in tqdm(jobs, desc=desc or "patched runs", leave=False, disable=not self.progress or len(jobs) < 2):
            a, b = self._spans()[s]
            part, abl, clean_logits = self._batch(s, a, b)
            clean, last = part.clean.to(dev), part.last.to(dev)
            if s not in bases:
                at = {edge: part.position_mask(list(names)).to(dev) for edge, names in position_edges.items()}
                bases[s] = at, plain if plain is not None else e.compile(mask[None].to(dev), at, *clean.shape)
                state = None
            at, base = bases[s]
            # the circuit's run paused at this layer: the batch's previous pause carried on from where it stopped
            state = e.patched_run(clean, abl, base, start=state, stop_layer=layer)
            kept_at = ~part.position_mask(list(positions)).to(dev) if positions else None  # where removed edges stay
            for idx in chunks[layer]:
                if positional:
                    removed = set(removals[idx[0]])
                    pos = {edge: pm for edge, pm in at.items() if edge not in removed}
                    pos.update({edge: kept_at for edge in removed} if positions else {})
                    trial = e.compile(without(idx), pos or None, *clean.shape)
                else:
                    trial = plans[tuple(idx)]
                logits = e.patched_run(clean, abl, trial, logit_positions=last, start=state)
                out[idx, a:b] = self._values(logits, part, clean_logits.expand(len(idx), -1, -1)).numpy()
        return self.reduce(out)

    def _values_recomputing_changed(self, mask: torch.Tensor, removals: list, desc: str | None) -> np.ndarray:
        """:meth:`values_without` by :class:`~circuitgraph.engine.removal.RemovalRuns`: per batch, the circuit's
        run once, then each removal recomputes only the nodes it changes (a removal that changes nothing
        reaching the logits keeps the circuit's own values).  On a CPU, one circuit at a time: the 378
        removals of a 300-edge SmolLM2-135M circuit over 16 IOI rows took 0.41x as long as resumed runs
        (``benchmarks/bench_explore.py``)."""
        e, dev = self.engine, self.model.device
        runs = RemovalRuns(e, mask)
        own = self.circuit_values(self._from_mask(mask))
        out = np.zeros((len(removals), len(self.data)), dtype=np.float64)
        plan = e.compile(mask[None].to(dev))
        jobs = [(s, i) for s in range(self.n_batches) for i in range(len(removals))]
        deltas = None
        for s, i in tqdm(jobs, desc=desc or "patched runs", leave=False, disable=not self.progress or len(jobs) < 2):
            a, b = self._spans()[s]
            part, abl, clean_logits = self._batch(s, a, b)
            clean, last = part.clean.to(dev), part.last.to(dev)
            if i == 0:
                deltas = e.patched_run(clean, abl, plan, stop_layer=self.graph.n_layers).flat
            logits = runs.logits(clean, abl, deltas, removals[i], last)
            out[i, a:b] = own[a:b] if logits is None else self._values(logits[None], part, clean_logits[None]).numpy()[0]
        return self.reduce(out)


def _check_inputs(model, data) -> tuple[CircuitModel, TaskData]:
    """A clear error for the objects people pass by habit (a model name, a HuggingFace or
    TransformerLens model, a file name or rows for the data); files and rows are loaded."""
    if not isinstance(model, CircuitModel):
        hint = (f"load it with circuitgraph.load_model({model!r})" if isinstance(model, (str, Path)) else
                "wrap a HuggingFace model with circuitgraph.CircuitModel(hf_model, tokenizer), or load one with circuitgraph.load_model(name)")
        raise TypeError(f"Evaluator needs a circuitgraph model, got {type(model).__name__}; {hint}")
    if isinstance(data, (str, Path, list, tuple)):
        data = load_dataset(data, model)
    elif not isinstance(data, TaskData):
        raise TypeError(f"Evaluator needs a dataset: a TaskData (circuitgraph.load_dataset), a JSONL path or a list of "
                        f"dicts with clean, corrupted, answer, wrong; got {type(data).__name__}")
    vocab, context = model_limits(model)
    if context is not None and data.clean.shape[1] > context:
        i = int(data.lengths.argmax())
        raise DataError(f"{data.where(i)}: the prompt is {int(data.lengths[i])} tokens, longer than the model's context of {context} tokens")
    model.check_padding(data)
    top = int(max(data.clean.max(), data.corrupted.max(), data.answers.max(), data.wrongs.max()))
    if top >= vocab:
        raise DataError(f"{data.source}: token id {top} is outside the model's vocabulary ({vocab}); was the data tokenized for another model?")
    return model, data


def _other_model(spec_model: str | None, model_name: str) -> str | None:
    """``model_name`` when a spec's ``model`` names a different model (hub org and folders ignored)."""
    if not spec_model:
        return None
    key = lambda n: str(n).rstrip("/").rsplit("/", 1)[-1].lower()
    return None if key(spec_model) == key(model_name) else model_name


def _connects(circuit: ResolvedCircuit) -> bool:
    """Whether the circuit's edges hold a path from ``input`` to ``logits``."""
    import networkx as nx

    g = circuit.graph
    dg = nx.DiGraph((g.sources[s], g.node_of(g.destinations[d])) for s, d in circuit.edges)
    return "input" in dg and "logits" in dg and nx.has_path(dg, "input", "logits")


def evaluate(model: CircuitModel, data: TaskData, circuit: CircuitSpec, **kw) -> CircuitScore:
    """One-call scoring of a circuit (see :class:`Evaluator` for the options)."""
    return Evaluator(model, data, **kw).evaluate(circuit)
