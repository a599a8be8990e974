"""The offline tour: hypothesis -> verification -> discovery -> figure, on the bundled toy-induction model."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

SPEC_DIR = Path(__file__).resolve().parents[1] / "specs"


def run_demo(out: Path, n_examples: int = 64, progress: bool = True) -> dict:
    """Run the offline tour into ``out`` (specs, figures, the
    explorer page, ``summary.json``) and return the summary."""
    from rich.console import Console
    from rich.table import Table

    from circuitgraph.data.dataset import Example, tokenize
    from circuitgraph.discovery import discover, faithfulness_curve, roc_auc
    from circuitgraph.evaluate.path_patching import path_patch_sweep, plot_path_patching
    from circuitgraph.model.loading import load_model
    from circuitgraph.render.figure import render
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.spec.circuit_spec import CircuitSpec
    from circuitgraph.data.tasks import make_data, write_jsonl

    if n_examples < 2:
        raise ValueError(f"-n {n_examples}: the demo needs at least 2 prompts (standard errors need two)")
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_model("toy-induction")
    console.print(f"[bold]1. Model[/bold] {model}: {len(model.graph.nodes)} nodes, {model.graph.n_edges} edges")

    rows = make_data("induction", model.tokenizer, n_examples, seed=0)
    write_jsonl(rows, out / "induction.jsonl")
    data = tokenize([Example(**r) for r in rows], model.tokenizer)
    console.print(f"[bold]2. Task[/bold] {len(rows)} induction prompts -> {out / 'induction.jsonl'}")

    spec = CircuitSpec.load(SPEC_DIR / "induction_toy.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = Evaluator(model, data, progress=progress)
        score = ev.evaluate(spec)
    t = Table(title=f"3. Hypothesis: {spec.name} ({score.n_edges} of {score.n_edges_total} edges)")
    for col in ("metric", "value", "± s.e."):
        t.add_column(col, justify="right" if col != "metric" else "left")
    t.add_row("clean logit diff", f"{score.clean_metric:.3f}", f"{score.clean_metric_se:.3f}")
    t.add_row("corrupted logit diff", f"{score.corrupted_metric:.3f}", f"{score.corrupted_metric_se:.3f}")
    t.add_row("faithfulness (sufficiency)", f"{score.faithfulness:.3f}", f"{score.faithfulness_se:.3f}")
    t.add_row("necessity", f"{score.necessity:.3f}", f"{score.necessity_se:.3f}")
    console.print(t)
    effects = ev.edge_effects(spec)
    render(spec, model.graph, out / "hypothesis.png", verified={k: v[0] for k, v in effects.items()},
           title=f"{spec.name}: faithfulness {score.faithfulness:.2f}")

    keys = [f"{h}<k>" for h in spec.groups["induction"].nodes]
    sweep = path_patch_sweep(model, data, keys, evaluator=ev)
    plot_path_patching(sweep, out / "path_patching.png", title="path patching -> induction heads' keys")
    top = ", ".join(f"{n} {v:+.2f}" for n, v in sweep.top(3))
    console.print(f"[bold]4. Connections[/bold] path patching into the induction heads' keys, strongest senders: {top}")

    scores = discover(ev, "eap-ig", steps=5, progress=progress)
    n = int(score.n_edges)
    found = scores.to_spec(scores.greedy(n), prune=True, model="toy-induction", selection=f"greedy top {n}")
    found.name = "EAP-IG circuit"
    found_score = ev.evaluate(found)
    found.to_json(out / "discovered.json")
    auc, _, _ = roc_auc(scores, spec.resolve(model.graph).edge_mask())
    curve = faithfulness_curve(ev, scores)
    curve.plot(out / "faithfulness_curve.png")
    render(found, model.graph, out / "discovered.png", title=f"EAP-IG, {len(found.edges)} edges: faithfulness {found_score.faithfulness:.2f}")
    render(found, model.graph, out / "discovered.svg")
    console.print(f"[bold]5. Discovery[/bold] EAP-IG (5 steps) in {scores.meta['seconds']:.1f}s: top {len(found.edges)} edges "
                  f"faithfulness {found_score.faithfulness:.3f}; AUC vs the hypothesis {auc:.3f}; CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}")
    from circuitgraph.explore import Study

    from circuitgraph.explore.study_data import Limits

    page = Study.collect(model, data, spec, found, evaluator=ev, edge_effects=[effects, None],  # effects of every row
                         limits=Limits(effect_rows=len(data)), title="toy-induction: hypothesis vs EAP-IG").to_html(out / "study.html")
    console.print(f"[bold]6. Explorer[/bold] {page}: the circuits, heads and prompts to explore in a browser (offline)")
    summary = {"hypothesis": score.to_dict(), "discovered": {"n_edges": len(found.edges), "faithfulness": found_score.faithfulness,
               "auc_vs_hypothesis": auc, "cpr": curve.cpr, "cmd": curve.cmd}, "seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"[bold]7. Files[/bold] in {out.resolve()}:")
    for f in sorted(out.iterdir()):
        console.print(f"   {f.name}")
    console.print(f"done in {summary['seconds']:.1f}s")
    return summary


def register_cli(sub):
    """Add ``circuitgraph demo [-o DIR] [-n N]``."""
    p = sub.add_parser("demo", help="offline end-to-end tour on the bundled toy-induction model")
    from circuitgraph.cli.checks import check_output_dir, positive_int

    p.add_argument("-o", "--out", type=Path, default=Path("circuitgraph-demo"), help="folder for the outputs")
    p.add_argument("-n", type=positive_int, default=64, help="number of prompts")
    p.set_defaults(func=lambda args: (run_demo(check_output_dir(args.out), args.n), 0)[1])
