"""Data parallelism over ``torch.distributed``: ranks take whole batches of examples in turn and
sum what they computed, so every rank ends with the result one process would compute.

The Evaluator and discovery shard automatically whenever a default process group is initialised
(``torchrun`` sets the environment; :func:`init` creates the group from it).  What is summed:

* per-example metric values ``[C, N]``: each rank fills the columns of its own examples and the
  rest stay zero, so the sum over ranks is exact (adding zeros rounds nothing) and bitwise the
  same on every rank -- ACDC's decisions, taken from these values, agree everywhere;
* edge-score sums and mean-ablation sums (float64 / float32): equal to one process up to the
  order of the additions.

Without a process group (or with one of size 1) every function is the identity.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.distributed as dist


def active() -> bool:
    """True when a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not under torch.distributed)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks (1 when not under torch.distributed)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Only rank 0 prints and writes files."""
    return rank() == 0


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for(device: str | torch.device) -> torch.device:
    """``cuda`` -> this rank's GPU (``cuda:LOCAL_RANK``) under a launcher; anything else unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device: str | torch.device = "cpu") -> bool:
    """Join the process group described by the launcher's environment (``torchrun`` sets
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).  CPU tensors go through gloo, CUDA
    tensors through NCCL.  Returns whether a group of more than one rank is now running."""
    if dist.is_initialized() or not launched():
        return active()
    device = device_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return active()


def close() -> None:
    """Leave the process group :func:`init` joined (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n_examples: int, batch_size: int) -> list[tuple[int, tuple[int, int]]]:
    """This rank's ``(batch index, (start, stop))`` mini-batches.

    The batches are those of one process, except that with more ranks than batches the batch
    shrinks so that every rank gets work; rank ``r`` takes batches ``r, r + W, r + 2W, ...``."""
    W = world_size()
    if W > 1:
        batch_size = max(1, min(batch_size, math.ceil(n_examples / W)))
    spans = [(i, min(i + batch_size, n_examples)) for i in range(0, n_examples, batch_size)]
    return [(i, s) for i, s in enumerate(spans)][rank()::W]


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (in place where possible; returns the summed tensor)."""
    if not active():
        return x
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_min(value: float) -> float:
    """The smallest of one number over ranks (through the CPU backend), so that choices made from it,
    such as the batch, agree on every rank."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t)


def all_sum_array(x: np.ndarray) -> np.ndarray:
    """:func:`all_sum` for a NumPy array (per-example values)."""
    if not active():
        return x
    return all_sum(torch.from_numpy(np.ascontiguousarray(x))).numpy()


__all__ = ["active", "all_min", "all_sum", "all_sum_array", "close", "device_for", "init", "is_main", "launched", "rank",
           "shard", "world_size"]
