"""Run MIB's own circuit-track code, offline, on what ``circuitgraph mib-export`` / ``mib-data`` produce.

MIB's leaderboard evaluates a submission with mttk/MIB-circuit-track-autoeval: ``check_submissions.py``
only fetches requests from the hub and queues them (it cannot run offline); ``eval_submissions.py``
finds the ``<task>_<model>`` folders (its ``process_directory``, nested in ``main``) and calls
``run_evaluation.run_evaluation`` on each, which loads the folder (one file: importance scores,
``Graph.from_json`` + ``apply_topn``; several: circuits, ``load_graph_from_json``) and computes the
faithfulness curve with EAP-IG's ``evaluate_graph``.  This script runs exactly that code with two
things swapped for offline stand-ins, both outside the code under test: the model
(``HookedTransformer.from_pretrained`` returns a random model of the MIB model's layer and head
counts, small width, with a given tokenizer) and the dataset (MIB's ``load_dataset`` call reads a
local file in the hub schema instead of the private test set).

    mib_checker.py --autoeval DIR evaluate SUBMISSION_DIR... --tokenizer TOKDIR --data ioi=rows.jsonl
        -> JSON: every folder MIB's scan finds, and per ranking its edge counts and faithfulnesses
    mib_checker.py --autoeval DIR dataset --tokenizer TOKDIR --case ioi=rows.jsonl[@COUNTERFACTUAL] ...
        -> JSON: per case MIB's HFEAPDataset items (clean, corrupted, [answer id, wrong id])

It runs in MIB's own environment (TransformerLens 2.x, which still has HookedTransformer), not
ours, and imports nothing from circuitgraph.  Recipe (tested with the versions named)::

    git clone https://github.com/mttk/MIB-circuit-track-autoeval autoeval      # tested at b48d9ba
    git -C autoeval submodule update --init                                    # EAP-IG at 61367f1
    python3 -m venv mib-venv
    mib-venv/bin/pip install torch "transformer-lens==2.16.1" "transformers==4.46.3" \\
        "datasets==3.1.0" "huggingface-hub==0.26.5" pygraphviz     # pygraphviz needs libgraphviz-dev
    export MIB_PYTHON=$PWD/mib-venv/bin/python MIB_AUTOEVAL=$PWD/autoeval
    python -m pytest tests/test_mib_io.py                         # the tests that need them stop skipping
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import os
import sys

# the layer and head counts of MODEL_NAME_TO_FULLNAME's models (what from_pretrained would load)
SHAPES = {"gpt2-small": (12, 12), "Qwen/Qwen2.5-0.5B": (24, 14), "google/gemma-2-2b": (26, 8),
          "meta-llama/Llama-3.1-8B": (32, 32)}


def _setup(autoeval: str) -> None:
    for path in (autoeval, os.path.join(autoeval, "EAP-IG", "src")):
        if not os.path.isdir(path):
            sys.exit(f"mib_checker: '{path}' is not a folder (see the recipe at the top of this script)")
        sys.path.insert(0, path)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _local_datasets(files: dict[str, str]) -> None:
    """MIB's dataset module asks the hub for ``mib-bench/<name>``; answer with the local file of that task."""
    import datasets
    import MIB_circuit_track.dataset as mib_dataset
    from MIB_circuit_track.utils import TASKS_TO_HF_NAMES

    by_hub = {f"mib-bench/{hub}": files[task] for task, hub in TASKS_TO_HF_NAMES.items() if task in files}

    def load_dataset(url, *args, split=None, token=None, **kw):
        if url not in by_hub:
            raise FileNotFoundError(f"no local data given for {url} (--data TASK=FILE)")
        return datasets.load_dataset("json", data_files=by_hub[url], split="train")

    mib_dataset.load_dataset = load_dataset


def _process_directory(autoeval: str):
    """``process_directory`` from ``eval_submissions.py``: it is nested in ``main``, so it is lifted out
    of the syntax tree and compiled with the module-level names it uses."""
    from MIB_circuit_track.utils import MODEL_NAME_TO_FULLNAME, TASKS_TO_HF_NAMES

    source = open(os.path.join(autoeval, "eval_submissions.py")).read()
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    fn = next(n for n in ast.walk(main) if isinstance(n, ast.FunctionDef) and n.name == "process_directory")
    namespace = {"os": os, "logging": logging, "TASKS_TO_HF_NAMES": TASKS_TO_HF_NAMES,
                 "MODEL_NAME_TO_FULLNAME": MODEL_NAME_TO_FULLNAME}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "eval_submissions.py", "exec"), namespace)
    return namespace["process_directory"]


def cmd_dataset(args) -> dict:
    import MIB_circuit_track.dataset as mib_dataset
    from MIB_circuit_track.utils import TASKS_TO_HF_NAMES

    tok = _tokenizer(args.tokenizer)
    out = []
    for case in args.case:
        task, _, rest = case.partition("=")
        path, _, counterfactual = rest.partition("@")
        _local_datasets({task: path})
        ds = mib_dataset.HFEAPDataset(f"mib-bench/{TASKS_TO_HF_NAMES[task]}", tok, split="train", task=task,
                                      counterfactual_type=counterfactual or None, model_name="gpt2")
        items = []
        for i in range(len(ds)):
            clean, corrupted, labels = ds[i]
            items.append([clean, corrupted, [int(x) for x in labels]])
        out.append({"case": case, "items": items})
    return {"cases": out}


def cmd_evaluate(args) -> dict:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    import run_evaluation

    files = dict(item.split("=", 1) for item in args.data)
    _local_datasets(files)
    tok = _tokenizer(args.tokenizer)

    class RandomModel:
        """``HookedTransformer.from_pretrained`` for run_evaluation: a random model of the right shape."""

        @staticmethod
        def from_pretrained(name, **kwargs):
            n_layers, n_heads = SHAPES[name]
            cfg = HookedTransformerConfig(n_layers=n_layers, n_heads=n_heads, d_model=args.d_model, d_head=4,
                                          d_mlp=2 * args.d_model, d_vocab=len(tok), n_ctx=64, act_fn="gelu_new",
                                          normalization_type="LN", seed=args.seed, device="cpu")
            return HookedTransformer(cfg, tokenizer=tok)

    run_evaluation.HookedTransformer = RandomModel
    torch.set_num_threads(max(1, args.threads))
    process_directory = _process_directory(args.autoeval)
    configs = [dict(c, submission=sub) for sub in args.submission for c in process_directory(sub)]
    out = []
    for config in sorted(configs, key=lambda c: (c["submission"], c["path_info"])):
        runs = []
        absolutes = [True, False] if config["absolute_specified"] is None else [config["absolute_specified"]]
        for absolute in absolutes:  # as eval_submissions.py's main
            run = {"absolute": absolute}
            try:
                results = run_evaluation.run_evaluation(config["circuit_dir"], config["model"], config["task"], "test",
                                                        "method", "edge", batch_size=20, head=None, absolute=absolute)
                if results is None:
                    run["error"] = "run_evaluation returned nothing (a task/model pair the leaderboard does not score)"
                else:
                    run.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in results.items()})
            except Exception as e:  # noqa: BLE001 -- reported per folder, as eval_submissions.py logs it
                run["error"] = f"{type(e).__name__}: {e}"
            runs.append(run)
        out.append({"submission": config["submission"], "path_info": config["path_info"], "task": config["task"], "model": config["model"],
                    "absolute_specified": config["absolute_specified"], "runs": runs})
    return {"configs": out, "tasks": sorted({c["task"] for c in out}), "models": sorted({c["model"] for c in out})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoeval", required=True, help="checkout of mttk/MIB-circuit-track-autoeval with its EAP-IG submodule")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate")
    p.add_argument("submission", nargs="+", help="method folder(s) (what would be uploaded)")
    p.add_argument("--tokenizer", required=True, help="a HF tokenizer folder for the random models and the data")
    p.add_argument("--data", nargs="+", required=True, help="TASK=FILE: rows in the hub dataset's schema for each task")
    p.add_argument("--d-model", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("dataset")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--case", nargs="+", required=True, help="TASK=FILE or TASK=FILE@COUNTERFACTUAL")
    args = parser.parse_args()
    _setup(args.autoeval)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # MIB's code prints its progress; stdout carries the JSON only
        result = cmd_evaluate(args) if args.command == "evaluate" else cmd_dataset(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
