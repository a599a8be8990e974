"""What every model-running subcommand shares: its model/data flags and how it loads them."""

from __future__ import annotations

import argparse

from circuitgraph.cli.checks import check_device, memory_mib, positive_int
from circuitgraph.evaluate import distributed as dist
from circuitgraph.evaluate.evaluator import ABLATIONS
from circuitgraph.evaluate.metrics import METRICS as _METRIC_FUNCTIONS

METRICS = tuple(_METRIC_FUNCTIONS)  # the --metric choices: the registered metrics
DTYPES = ("float32", "bfloat16", "float16")
# commands that split their examples over torch.distributed ranks; the others run on rank 0 only
DISTRIBUTED_COMMANDS = ("evaluate", "discover", "path-patch")


def load_model_and_data(args, need_data: bool = True):
    """The model and (read first, so that a bad line fails before the model loads) the dataset."""
    import torch

    from circuitgraph.data.dataset import read_jsonl, tokenize
    from circuitgraph.model.loading import load_model

    device = check_device(getattr(args, "device", "cpu"))
    placement = dict(device_map="auto") if device == "auto" else dict(device=dist.device_for(device))
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    examples = read_jsonl(args.data) if need_data else None
    model = load_model(args.model, dtype=dtype, check_exact=not getattr(args, "no_exactness_check", False), **placement)
    data = None
    if need_data:
        data = tokenize(examples, model, prepend_bos=args.prepend_bos, source=str(args.data))
    return model, data


def add_model_args(p: argparse.ArgumentParser, data: bool = True, budget: bool = False):
    """--model, --data, --prepend-bos, --batch-size, [--memory-budget,] --device, --dtype, --no-exactness-check."""
    p.add_argument("--model", required=True,
                   help="hub name, local HuggingFace directory, bundled model name, .gguf file (dequantized once, "
                        "then cached) or a named model such as smollm2-135m-q4")
    if data:
        p.add_argument("--data", required=True, help="JSONL dataset (clean, corrupted, answer, wrong[, positions])")
        p.add_argument("--prepend-bos", action="store_true", help="put the BOS token first (TransformerLens habit)")
        p.add_argument("--batch-size", type=positive_int, default=32)
    if budget:  # commands that patch through the Evaluator
        p.add_argument("--memory-budget", type=memory_mib, metavar="SIZE", default=None,
                       help="cap the batch (and the circuits stacked per pass) so the buffers that grow with them "
                            "fit in this much memory beside the model (MiB, or with a unit: 512MiB, 8GiB, 16GB); "
                            "the results are the same")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N, mps (under torchrun, cuda means each rank's own GPU), or auto: one model "
                        "sharded layer by layer over every visible GPU, for models larger than one")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and activations; metrics and score sums accumulate in fp32 either way")
    p.add_argument("--no-exactness-check", action="store_true",
                   help="skip comparing the engine's clean logits with the model's own forward on the first batch")
