"""Scores of a circuit: faithfulness (sufficiency), necessity, per-edge and per-node effects.

``faithfulness = (M(circuit) - M(ablated)) / (M(clean) - M(ablated))`` where ``M(ablated)`` is
the metric with every edge ablated (the corrupted run under corrupted ablation);
``necessity = 1 - (M(complement) - M(ablated)) / (M(clean) - M(ablated))``.  Spreads are
bootstrap standard errors over examples (the ratio of means has no closed form).

When ``M(clean)`` and ``M(ablated)`` are equal within noise the ratios mean nothing: they are
reported as ``None`` with the reason (:func:`normalisation_problem`), never as a number; so is a
standard error from one example.

:class:`Evaluator` does four jobs, one module each: batching and memory
(:mod:`~circuitgraph.evaluate.batches`), metrics and baselines (:mod:`~circuitgraph.evaluate.baselines`),
scoring whole circuits (:mod:`~circuitgraph.evaluate.scoring`) and effects of removals
(:mod:`~circuitgraph.evaluate.effects`); this module holds its construction.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

from circuitgraph.data.dataset import DataError, TaskData, load_dataset, model_limits
from circuitgraph.evaluate import distributed as dist
from circuitgraph.evaluate.baselines import Baselines, bootstrap_se, normalisation_problem, normalised, zero_gap
from circuitgraph.evaluate.batches import AUTO_BUDGET_SHARE, Batches, free_mb
from circuitgraph.evaluate.effects import Effects
from circuitgraph.evaluate.metrics import get_metric
from circuitgraph.evaluate.scoring import MEMO_CIRCUITS, CircuitScore, Scoring
from circuitgraph.model.loading import CircuitModel
from circuitgraph.spec.circuit_spec import CircuitSpec

ABLATIONS = ("corrupted", "mean", "zero")


class Evaluator(Batches, Baselines, Scoring, Effects):
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
        self._clean_prefixes: dict[int, list] = {}  # per batch: the clean run's prefix states (ACDC, path patching)
        self._circuit_memo: OrderedDict = OrderedDict()  # circuit_values of the last few circuits
        cached = self.pass_mb(len(data), circuits=0)  # every batch's ablated run
        # kept beside one pass of the circuits
        cache_budget_mb = min(cache_budget_mb, self._limit_mb - self.pass_mb(self.batch_size, self.circuits_per_pass)
                              + self.pass_mb(self.batch_size, circuits=0))
        self._cache_ok = ablation == "corrupted" and cached <= cache_budget_mb
        self.clean_values, self.base_values = self._baselines()


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


def evaluate(model: CircuitModel, data: TaskData, circuit: CircuitSpec, **kw) -> CircuitScore:
    """One-call scoring of a circuit (see :class:`Evaluator` for the options)."""
    return Evaluator(model, data, **kw).evaluate(circuit)


__all__ = ["ABLATIONS", "AUTO_BUDGET_SHARE", "MEMO_CIRCUITS", "CircuitScore", "Evaluator", "bootstrap_se", "evaluate",
           "free_mb", "normalisation_problem", "normalised", "zero_gap"]
