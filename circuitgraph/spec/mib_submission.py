"""A scored circuit as a submission to MIB's circuit-localization track.

The layout is the one MIB's evaluator reads (``eval_submissions.py`` and ``run_evaluation.py`` of
mttk/MIB-circuit-track-autoeval, the README of hannamw/MIB-circuit-track):

* one folder per task and model, ``<task>_<model>`` with the task spelled with hyphens
  (``ioi_gpt2``, ``arc-easy_llama3``, ``arithmetic-addition_llama3``), inside one folder per method
  (``run_attribution.py`` names it ``<method>_<ablation>_<level>``);
* either one file of importance scores for every edge (``importances.json``: a folder holding
  exactly one file is read as scores, and the evaluator takes its top ``floor(f * n_edges)`` edges
  itself, by signed score for CPR and by |score| for CMD), or nine circuits, one with at most
  each of 0.1, 0.2, 0.5, 1, 2, 5, 10, 20 and 50 % of the edges (a folder of several files; the
  evaluator adds the full model as the tenth point).  Circuits for the two rankings go in
  ``abs-False/`` (CPR) and ``abs-True/`` (CMD) folders, which the evaluator reads with that
  ranking only;
* every file is the EAP-IG circuit JSON (``cfg``, ``nodes``, ``edges`` with ``score`` and
  ``in_graph``), the shape in ``cfg`` being the model's.  A submission needs at least two models
  and two tasks; the leaderboard scores the task/model pairs of ``LEADERBOARD``.

Sign: our scores estimate the change of the metric when an edge is ablated (negative for edges
the task needs under logit difference).  MIB's ``run_attribution.py`` attributes the loss (minus
the logit difference), and its evaluator's signed ranking takes the highest scores first, so the
default written sign is ``loss``: the negated scores, positive for edges the task needs.  Every
file says the sign it holds in a top-level ``metadata`` object (MIB's loaders ignore it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitgraph.data.mib import TASKS, mib_task
from circuitgraph.graph import Graph, mib_prune
from circuitgraph.spec.circuit_spec import CircuitSpec, SpecError


@dataclass(frozen=True)
class MibModel:
    """A model on MIB's leaderboard: its hub names and the shape that gives MIB's edge counts."""

    hub: tuple[str, ...]  # hub names of the model (the first is the one MIB loads)
    n_layers: int
    n_heads: int
    d_model: int

    @property
    def graph(self) -> Graph:
        """The model's computational graph (no weights needed)."""
        return Graph(self.n_layers, self.n_heads, False, self.d_model)


# MIB_circuit_track/utils.py MODEL_NAME_TO_FULLNAME; the shapes give evaluation.py's EDGE_COUNTS
MODELS: dict[str, MibModel] = {
    "gpt2": MibModel(("gpt2", "openai-community/gpt2", "gpt2-small"), 12, 12, 768),
    "qwen2.5": MibModel(("Qwen/Qwen2.5-0.5B",), 24, 14, 896),
    "gemma2": MibModel(("google/gemma-2-2b",), 26, 8, 2304),
    "llama3": MibModel(("meta-llama/Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B"), 32, 32, 4096),
}
# MIB_circuit_track/utils.py COL_MAPPING: the task/model pairs the leaderboard evaluates
LEADERBOARD: dict[str, tuple[str, ...]] = {
    "ioi": ("gpt2", "qwen2.5", "gemma2", "llama3"),
    "mcqa": ("qwen2.5", "gemma2", "llama3"),
    "arithmetic_addition": ("llama3",),
    "arithmetic_subtraction": ("llama3",),
    "arc_easy": ("gemma2", "llama3"),
    "arc_challenge": ("llama3",),
}
# the nine circuit sizes of the multiple-circuit layout (evaluation.py's percentages but the full model)
FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
SIGNS = ("loss", "ours")
LAYOUTS = ("importances", "circuits")
RANKINGS = ("both", "signed", "absolute")
HIGHER_IS_BETTER = {"logit_diff": True, "prob_diff": True, "accuracy": True, "kl": False}
SIGN_MEANING = {
    "loss": "change of the loss (minus the metric) when the edge is ablated: positive for edges the task needs "
            "(MIB's run_attribution.py convention; its signed ranking takes the highest first)",
    "ours": "change of the metric when the edge is ablated: negative for edges the task needs (circuitgraph's convention)",
}


def mib_model(name: str) -> str:
    """MIB's model name (``qwen2.5``) from itself or a hub name of the model (``Qwen/Qwen2.5-0.5B``)."""
    key = str(name).strip()
    if key.lower() in MODELS:
        return key.lower()
    for short, m in MODELS.items():
        if key.lower() in (h.lower() for h in m.hub):
            return short
    raise SpecError(f"unknown MIB model '{name}'; expected one of {', '.join(MODELS)} (or their hub names: "
                    f"{', '.join(m.hub[0] for m in MODELS.values())})")


def folder_name(task: str, model: str) -> str:
    """``<task>_<model>`` as MIB names the folder (``arc-easy_llama3``)."""
    return f"{task.replace('_', '-')}_{model}"


def check_pair(task: str, model: str) -> None:
    """The leaderboard evaluates only some task/model pairs (``run_evaluation.py`` skips the rest)."""
    if model not in LEADERBOARD[task]:
        raise SpecError(f"MIB's leaderboard does not evaluate task {task} on {model}; for {task} it takes "
                        f"{', '.join(LEADERBOARD[task])}")


def stated_sign(spec: CircuitSpec) -> str | None:
    """The sign a spec's scores carry: ours for our spec files, what an MIB file's metadata says,
    and None for an MIB file that says nothing (the sign cannot be known)."""
    if "mib_cfg" not in spec.metadata:
        return "ours"
    meta = spec.metadata.get("mib_extra", {}).get("metadata")
    sign = meta.get("score_sign") if isinstance(meta, dict) else None
    return sign if sign in SIGNS else None


def spec_task_model(spec: CircuitSpec) -> tuple[str | None, str | None]:
    """The task and model a spec names: its own fields, else the metadata of a file this module wrote,
    else (model only) the MIB model whose shape its MIB ``cfg`` has."""
    extra = spec.metadata.get("mib_extra", {}).get("metadata")
    extra = extra if isinstance(extra, dict) else {}
    task, model = spec.task or extra.get("task"), spec.model or extra.get("model")
    cfg = spec.metadata.get("mib_cfg")
    if model is None and isinstance(cfg, dict):
        model = next((k for k, m in MODELS.items() if (cfg.get("n_layers"), cfg.get("n_heads")) == (m.n_layers, m.n_heads)), None)
    return task, model


def _check_shape(spec: CircuitSpec, model: str, where: str) -> None:
    m = MODELS[model]
    cfg = spec.metadata.get("mib_cfg")
    if isinstance(cfg, dict):
        want = {"n_layers": m.n_layers, "n_heads": m.n_heads, "parallel_attn_mlp": False, "d_model": m.d_model}
        for key, value in want.items():
            if key in cfg and cfg[key] != value:
                raise SpecError(f"{where}: its cfg has {key}={cfg[key]!r} but MIB's {model} ({m.hub[0]}) has {value!r}")
    if spec.model:
        try:
            named = mib_model(spec.model)
        except SpecError:
            return  # a local path or another name: the edge count below decides
        if named != model:
            alias = "" if spec.model == named else f", which is MIB's {named}"
            raise SpecError(f"{where}: it was found on {spec.model}{alias}, not on {model}")


def loss_scores(spec: CircuitSpec, graph: Graph, where: str, input_sign: str | None = None,
                metric: str | None = None) -> tuple[torch.Tensor, str]:
    """Every edge's score in the loss sign, in ``graph.edges`` order, and the metric assumed.

    Refuses a spec that does not score every edge of ``graph``: MIB ranks all of them, and an
    edge without a score has no place in that ranking."""
    stated = stated_sign(spec)
    if input_sign is not None and stated is not None and "mib_cfg" in spec.metadata and input_sign != stated:
        raise SpecError(f"{where}: its metadata says its scores carry the {stated} sign, not {input_sign}; drop --input-sign")
    sign = stated if stated is not None and "mib_cfg" in spec.metadata else (input_sign or stated)
    if sign is None:
        raise SpecError(f"{where}: an MIB circuit file that does not say the sign of its scores; give --input-sign "
                        f"ours (change of the metric, e.g. circuitgraph discover --format mib) or loss (MIB's run_attribution.py)")
    scores = dict(spec.edge_scores)
    for e in spec.edges:
        if e.score is not None:
            scores.setdefault(e.edge, e.score)
    if not scores:
        raise SpecError(f"{where}: the spec has no edge scores; MIB ranks every edge by its score (export the output "
                        f"of circuitgraph discover, which scores every edge)")
    unknown = [e for e in scores if e not in graph.edge_index]
    if unknown:
        raise SpecError(f"{where}: scores edge '{unknown[0]}', which the model does not have"
                        + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    missing = [e for e in graph.edges if scores.get(e) is None]
    if missing:
        null = [e for e in missing if e in scores]
        why = f"'{null[0]}' has a null score" if null else f"'{missing[0]}' has none (was the spec found on a smaller model?)"
        raise SpecError(f"{where}: scores {graph.n_edges - len(missing):,} of the model's {graph.n_edges:,} edges; "
                        f"MIB ranks every edge, and {why}")
    values = torch.tensor([float(scores[e]) for e in graph.edges], dtype=torch.float64)
    if not bool(torch.isfinite(values).all()):
        bad = graph.edges[int(torch.nonzero(~torch.isfinite(values))[0])]
        raise SpecError(f"{where}: edge '{bad}' has a score that is not a finite number")
    extra = spec.metadata.get("mib_extra", {}).get("metadata")
    metric = metric or spec.metadata.get("metric") or (extra.get("metric") if isinstance(extra, dict) else None) or "logit_diff"
    if metric not in HIGHER_IS_BETTER:
        raise SpecError(f"{where}: scores of metric '{metric}' have no known sign; expected one of {', '.join(HIGHER_IS_BETTER)}")
    if sign == "ours" and HIGHER_IS_BETTER[metric]:
        values = -values
    return values, metric


def _edge_positions(graph: Graph) -> torch.Tensor:
    """``[n_edges, 2]``: (source, destination) of each edge in ``graph.edges`` order."""
    return torch.tensor([graph.edge_index[e] for e in graph.edges], dtype=torch.long)


def _ranked_mask(values: torch.Tensor, where: torch.Tensor, shape, n: int, ranking: str) -> torch.Tensor:
    """``[n_sources, n_destinations]``: the ``n`` first edges, highest loss-sign score (``signed``) or |score| first
    (EAP-IG's ``apply_topn``, which ranks descending)."""
    key = values.abs() if ranking == "absolute" else values
    top = torch.topk(key, n).indices
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[where[top, 0], where[top, 1]] = True
    return mask


def _nodes(graph: Graph, mask: torch.Tensor) -> dict:
    """Every node, in the circuit when one of the ``mask`` edges touches it (EAP-IG's ``nodes`` entry)."""
    on = {graph.sources[s] for s in torch.nonzero(mask.any(1)).flatten().tolist()}
    on |= {graph.node_of(graph.destinations[d]) for d in torch.nonzero(mask.any(0)).flatten().tolist()}
    return {n: {"in_graph": n in on} for n in graph.nodes}


def _circuit_json(graph: Graph, where: torch.Tensor, cfg: dict, values: torch.Tensor, mask: torch.Tensor, meta: dict) -> dict:
    """An EAP-IG circuit listing only the ``mask`` edges (MIB's loader leaves unlisted edges out)."""
    on = mask[where[:, 0], where[:, 1]]
    edges = {graph.edges[i]: {"score": float(values[i]), "in_graph": True} for i in torch.nonzero(on).flatten().tolist()}
    return {"cfg": cfg, "nodes": _nodes(graph, mask), "edges": edges, "metadata": meta}


def _prepare(folder: Path, names: list[str]) -> None:
    """The folder may hold only the files we write: MIB reads a folder of one file as scores and of
    several as circuits, so a stray file changes what is evaluated."""
    if folder.exists():
        if not folder.is_dir():
            raise SpecError(f"'{folder}' is a file; expected a folder")
        stray = sorted(p.name for p in folder.iterdir() if p.name not in names)
        if stray:
            raise SpecError(f"'{folder}' already holds {', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''}; MIB reads every "
                            f"file there (one file = importance scores, several = circuits): remove them or choose another -o")
    folder.mkdir(parents=True, exist_ok=True)


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, allow_nan=False) + "\n")


def check_spec(spec: CircuitSpec, task: str, model: str, input_sign: str | None = None,
               source: str | None = None) -> tuple[str, str, torch.Tensor, str]:
    """(task, model, loss-sign scores, metric) of a spec that fits MIB's ``task`` and ``model``; one
    line naming what does not fit otherwise (pair not on the leaderboard, another task or model,
    scores missing or of unknown sign)."""
    where = f"spec '{source}'" if source else "the spec"
    task, model = mib_task(task), mib_model(model)
    check_pair(task, model)
    if input_sign is not None and input_sign not in SIGNS:
        raise SpecError(f"unknown input sign '{input_sign}'; expected one of {', '.join(SIGNS)}")
    own_task, _ = spec_task_model(spec)
    if own_task:
        try:
            named = mib_task(own_task)
        except ValueError:
            named = None  # a task MIB does not have: nothing to compare
        if named is not None and named != task:
            raise SpecError(f"{where}: it is a circuit for task {named}, not {task}")
    _check_shape(spec, model, where)
    values, metric = loss_scores(spec, MODELS[model].graph, f"{where} for MIB's {model}", input_sign)
    return task, model, values, metric


def write_submission(spec: CircuitSpec, out_dir, task: str, model: str, method: str = "circuitgraph",
                     layout: str = "importances", ranking: str = "both", sign: str = "loss",
                     input_sign: str | None = None, source: str | None = None) -> list[Path]:
    """Write ``spec``'s scores for MIB task ``task`` and model ``model`` under ``out_dir/method``.

    ``sign``: ``loss`` (MIB's convention, default) or ``ours``.  ``input_sign``: the sign of the
    spec's scores when it is an MIB file that does not say.  ``layout``: ``importances`` (one
    file, MIB ranks it both ways) or ``circuits`` (nine pruned top-n circuits per ranking).
    Returns the files written."""
    for value, allowed, what in ((sign, SIGNS, "sign"), (layout, LAYOUTS, "layout"), (ranking, RANKINGS, "ranking")):
        if value not in allowed:
            raise SpecError(f"unknown {what} '{value}'; expected one of {', '.join(allowed)}")
    if not method or any(c in method for c in "/\\") or method in (".", ".."):
        raise SpecError(f"method name '{method}' must be a plain folder name")
    task, model, values, metric = check_spec(spec, task, model, input_sign, source)
    m = MODELS[model]
    graph = m.graph
    # the written sign: ours is minus the loss sign for a metric where higher is better, the same for KL
    written = values if sign == "loss" or not HIGHER_IS_BETTER[metric] else -values
    cfg = {"n_layers": m.n_layers, "n_heads": m.n_heads, "parallel_attn_mlp": False, "d_model": m.d_model}
    meta = {"score_sign": sign, "score": SIGN_MEANING[sign], "metric": metric, "task": task, "model": model,
            "method": method, "written_by": "circuitgraph mib-export"}
    if source:
        meta["source"] = str(source)
    root = Path(out_dir) / method
    where_edges = _edge_positions(graph)
    if layout == "importances":
        folder = root / folder_name(task, model)
        _prepare(folder, ["importances.json"])
        chosen = spec.resolve(graph).edge_mask()  # the spec's own circuit, kept as in_graph (MIB's ranking ignores it)
        on = chosen[where_edges[:, 0], where_edges[:, 1]].tolist()
        edges = {name: {"score": float(written[i]), "in_graph": on[i]} for i, name in enumerate(graph.edges)}
        out = {"cfg": cfg, "nodes": _nodes(graph, chosen), "edges": edges, "metadata": {**meta, "layout": "importances"}}
        path = folder / "importances.json"
        _dump(path, out)
        return [path]
    written_files: list[Path] = []
    rankings = ("signed", "absolute") if ranking == "both" else (ranking,)
    names = [f"circuit_{f * 100:g}pct.json" for f in FRACTIONS]
    for r in rankings:
        sub = root / ({"signed": "abs-False", "absolute": "abs-True"}[r] if ranking == "both" else "") / folder_name(task, model)
        _prepare(sub, names)
        for f, name in zip(FRACTIONS, names):
            n = int(f * graph.n_edges)  # MIB's int(pct * n_scored_items)
            mask = mib_prune(graph, _ranked_mask(values, where_edges, graph.legal.shape, n, r))
            info = {**meta, "layout": "circuits", "ranking": r, "fraction": f, "edges_requested": n,
                    "edges_after_pruning": int(mask.sum())}
            path = sub / name
            _dump(path, _circuit_json(graph, where_edges, cfg, written, mask, info))
            written_files.append(path)
    return written_files


def submission_pairs(method_dir) -> set[tuple[str, str]]:
    """The (task, model) folders a method folder holds (in ``abs-*`` folders too), by MIB's names."""
    found = set()
    root = Path(method_dir)
    folders = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    for p in list(folders):
        if p.name.lower().startswith("abs-"):
            folders += [q for q in p.iterdir() if q.is_dir()]
    for p in folders:
        task, _, model = p.name.partition("_")
        task = task.replace("-", "_")
        if task in TASKS and model in MODELS:
            found.add((task, model))
    return found


__all__ = ["FRACTIONS", "LEADERBOARD", "MODELS", "MibModel", "check_spec", "folder_name", "loss_scores", "mib_model", "spec_task_model", "stated_sign",
           "submission_pairs", "write_submission"]
