"""Batching and memory: how an evaluator cuts its data into mini-batches and passes, and the per-batch
clean and ablated runs every score reuses (cached when they fit; an evaluator on some rows of another
takes its rows from the other's cache)."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitgraph.engine.ablation import ablation_rows
from circuitgraph.evaluate import distributed as dist

if TYPE_CHECKING:
    from circuitgraph.evaluate.evaluator import Evaluator

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


class Batches:
    """The mini-batches of an :class:`~circuitgraph.evaluate.evaluator.Evaluator` and what one pass holds."""

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

    def _run_batches(self, jobs: list, run, n: int, desc: str | None, fallback: np.ndarray | None = None) -> np.ndarray:
        """The one run loop (scores, effects, resumed and node runs): per-example metric ``[n, N]`` from ``jobs`` of ``(rows of the result, batch, ...)``
        in order, ``run(job, part, ablation)`` giving their logits ``[len(rows), B, vocab]`` (or ``None``:
        ``fallback``'s values stand), summed over ranks."""
        out = np.zeros((n, len(self.data)), dtype=np.float64)
        spans = self._spans()
        for job in (tqdm(jobs, desc=desc or "patched runs", leave=False, disable=not self.progress) if len(jobs) > 1 else jobs):
            rows, s = job[0], job[1]
            a, b = spans[s]
            part, abl, clean_logits = self._batch(s, a, b)
            logits = run(job, part, abl)
            if logits is None:
                out[rows, a:b] = fallback[a:b]
            else:
                out[rows, a:b] = self._values(logits, part, clean_logits.expand(len(rows), -1, -1)).numpy()
        return self.reduce(out)

    @torch.no_grad()
    def _batch(self, i: int, a: int, b: int):
        """(data slice, ablation, clean last-position logits) of one mini-batch."""
        if i in self._cache:
            return self._cache[i]
        part = self.data.slice(a, b)
        dev = self.model.device
        parent = getattr(self, "_rows_from", None)  # an evaluator on rows of another: its runs serve when cached
        reused = parent[0]._cached_rows(parent[1][a:b], part.clean.shape[1]) if parent is not None else None
        if reused is not None:
            out = (part, *reused)
            if self._cache_ok:
                self._cache[i] = out
            return out
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

    def _cached_rows(self, rows: torch.Tensor, length: int):
        """``(ablation, clean logits)`` of dataset rows ``rows`` (any order, repeats allowed) cut to ``length``
        positions, from this evaluator's cached batches; ``None`` unless each batch they are in is cached and
        that long."""
        if not self._cache_ok or self.distributed:
            return None
        spans = self._spans()
        batch_of = lambda r: next(j for j, (a, b) in enumerate(spans) if a <= r < b)
        pieces, logits, run = [], [], []  # run: consecutive rows of one batch
        for k, r in enumerate(rows.tolist() + [None]):
            j = None if r is None else batch_of(r)
            if run and (j != run[0][0] or r is None):
                jj = run[0][0]
                if jj not in self._cache or self._cache[jj][0].clean.shape[1] < length:
                    return None
                _, abl, clean_logits = self._cache[jj]
                local = torch.tensor([x for _, x in run]) - spans[jj][0]
                pieces.append((abl, local))
                logits.append(clean_logits[local.to(clean_logits.device)])
                run = []
            if r is not None:
                run.append((j, r))
        return ablation_rows(pieces, length), torch.cat(logits)

    def first_rows(self, n: int) -> "Evaluator":
        """The same evaluator (ablation, mean outputs, batching) on the first ``n`` examples: a cheap
        look before a run on them all (itself when ``n`` covers the dataset)."""
        return self if n >= len(self.data) else self.on_rows(range(n))

    def on_rows(self, idx) -> "Evaluator":
        """The same evaluator (ablation, mean outputs, batching) on rows ``idx`` of its data, repeats allowed
        (a bootstrap resample); mean ablation keeps the means of the data it was made with."""
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        sub = copy.copy(self)
        sub.data, sub._cache, sub._clean_prefixes = self.data.take(idx), {}, {}
        for memo in ("_undefined", "_circuit_memo"):  # per-dataset results: none carry over to the rows
            sub.__dict__.pop(memo, None)
        if hasattr(self, "_circuit_memo"):
            sub._circuit_memo = type(self._circuit_memo)()
        sub._rows_from = (self, idx)
        sub.clean_values, sub.base_values = sub._baselines()
        return sub
