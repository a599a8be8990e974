"""IOI circuit discovery on a real trained model, SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized).

One command reproduces every number of ``studies/results/smollm2_ioi_discovery.{json,md}`` and the
figures beside them::

    python studies/smollm2_ioi_discovery.py [--model smollm2-135m-q4] [-n 64] [--exact-edges 150]

The recorded results came from three runs (curves; default selection and exact effects; activations)::

    python studies/smollm2_ioi_discovery.py -n 32 --methods "eap,eap-ig (right),eap-ig (left: MIB's)" --exact-edges 0
    python studies/smollm2_ioi_discovery.py -n 32 --methods "eap,eap-ig (right)" --no-curves --exact-edges 40 --name smollm2_ioi_selection
    python studies/smollm2_ioi_discovery.py -n 32 --methods eap-ig-activations --activation-rows 4 --exact-edges 0 --name smollm2_ioi_activations

What it runs, on ``-n`` IOI rows (``make-data ioi``, seed 0) and as many held-out rows (seed 1):

* attribution with EAP, EAP-IG over the inputs (5 steps, both step conventions: ``right`` = ours,
  ``left`` = the EAP-IG repository's / MIB's) and EAP-IG over activations, timed;
* each method's faithfulness curves under MIB's rules (signed and |score| rankings, floor sizes,
  pruning; CPR and CMD) with per-point standard errors;
* exact single-edge effects (each edge ablated alone, a resumed patched run) for the union of every
  method's top edges, against which the attributions are compared (Spearman rank correlation);
* the circuit ``discover`` chooses by default for EAP-IG, its size, its faithfulness on the held-out
  rows and the time the choice took next to the attribution's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = [("eap", "eap", {}), ("eap-ig (right)", "eap-ig", {"ig_points": "right"}),
           ("eap-ig (left: MIB's)", "eap-ig", {"ig_points": "left"}), ("eap-ig-activations", "eap-ig-activations", {})]


def _data(model, n: int, seed: int):
    from circuitgraph.data.dataset import Example, tokenize
    from circuitgraph.data.tasks import make_data

    rows = make_data("ioi", model.tokenizer, n, seed=seed)
    return tokenize([Example(**r) for r in rows], model, source=f"ioi seed {seed}")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from circuitgraph.discovery.curves import _average_ranks

    ra, rb = _average_ranks(a), _average_ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def exact_effects(ev, scores_by_method: dict, per_method: int) -> dict[str, float]:
    """Exact change of the metric when each listed edge alone is ablated (all other edges clean)."""
    g = ev.graph
    chosen: list[tuple[int, int]] = []
    for sc in scores_by_method.values():
        for s, d in torch.nonzero(sc.top_n(per_method)).tolist():
            if (s, d) not in chosen:
                chosen.append((s, d))
    full = g.legal.clone()
    values = ev.values_without(full, [[e] for e in chosen], desc="exact single-edge effects")
    clean = ev.clean_values.mean()
    return {f"{g.sources[s]}->{g.destinations[d]}": float(v.mean() - clean) for (s, d), v in zip(chosen, values)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-q4")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--exact-edges", type=int, default=150, help="top edges per method whose exact effect is measured")
    ap.add_argument("--methods", default=",".join(label for label, _, _ in METHODS),
                    help="comma-separated subset of: " + ", ".join(label for label, _, _ in METHODS))
    ap.add_argument("--activation-rows", type=int, default=8,
                    help="eap-ig-activations attributes on the first rows only (one forward and backward per source block "
                         "and step: 305 on this model, 8 s each over 32 rows on 2 cores); its curves use every row")
    ap.add_argument("--no-curves", action="store_true", help="skip the faithfulness curves (attribution and selection only)")
    ap.add_argument("--name", default="smollm2_ioi_discovery", help="results file name (in studies/results/)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from circuitgraph.discovery import discover, faithfulness_curve
    from circuitgraph.discovery.selection import smallest_faithful
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.model.loading import load_model

    RESULTS.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    model = load_model(args.model)
    data, held = _data(model, args.n, 0), _data(model, args.n, 1)
    ev = Evaluator(model, data)
    out: dict = {"model": args.model, "quantization": getattr(model, "quantization", None), "n_rows": args.n,
                 "n_edges": model.graph.n_edges, "clean_logit_diff": float(ev.clean_values.mean()),
                 "ablated_logit_diff": float(ev.base_values.mean()), "methods": {}}
    print(f"{args.model}: {model.graph.n_edges} edges; clean logit diff {out['clean_logit_diff']:.3f}, "
          f"ablated {out['ablated_logit_diff']:.3f}")
    scores, curves = {}, {}
    wanted = [m.strip() for m in args.methods.split(",")]
    for label, method, kw in [m for m in METHODS if m[0] in wanted]:
        on = ev.first_rows(args.activation_rows) if method == "eap-ig-activations" else ev
        sc = discover(on, method, steps=args.steps, **kw)
        scores[label] = sc
        out["methods"][label] = {"attribution_seconds": sc.meta["seconds"], "attribution_rows": len(on.data)}
        if not args.no_curves:
            t = time.perf_counter()
            curves[label] = pair = faithfulness_curve(ev, sc)
            out["methods"][label].update(curve_seconds=time.perf_counter() - t, **pair.to_dict())
            print(f"{label}: {sc.meta['seconds']:.1f}s; CPR {pair.cpr:.3f}, CMD {pair.cmd:.3f}")
        _save(out, curves, t0, args.model, args.name)  # each method's results as soon as they exist

    held_ev = Evaluator(model, held)
    out["default_selection"] = {}
    for label, sc in scores.items():  # the circuit `discover` chooses without --top-n, for each method
        t = time.perf_counter()
        sel = smallest_faithful(ev, sc)
        select_s = time.perf_counter() - t
        held_score = held_ev.evaluate(sc.to_spec(sel.mask))
        out["default_selection"][label] = {
            "method": sc.method, "how": sel.how, "ranking": sel.ranking, "n_edges": int(sel.n_edges),
            "fraction": sel.n_edges / model.graph.n_edges, "faithfulness": sel.faithfulness, "seconds": select_s,
            "attribution_seconds": sc.meta["seconds"],
            "held_out": {"faithfulness": held_score.faithfulness, "faithfulness_se": held_score.faithfulness_se,
                         "necessity": held_score.necessity, "necessity_se": held_score.necessity_se}}
        print(f"{label}: default selection {sel.n_edges} edges ({sel.ranking}) in {select_s:.1f} s "
              f"after an attribution of {sc.meta['seconds']:.1f} s", flush=True)
        _save(out, curves, t0, args.model, args.name)
    if args.exact_edges:
        _exact(ev, scores, args.exact_edges, out)
        _save(out, curves, t0, args.model, args.name)
        _scatter(scores, out["exact"]["effects"], RESULTS / "smollm2_ioi_exact.png")
    print(f"wrote {RESULTS / (args.name + '.md')} in {out['seconds']:.0f}s")
    return 0


def _save(out: dict, curves: dict, t0: float, model: str, name: str) -> None:
    out["seconds"] = time.perf_counter() - t0
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    (RESULTS / f"{name}.md").write_text(_markdown(out))
    if curves:
        _figure(curves, RESULTS / ("smollm2_ioi_curves.png" if name == "smollm2_ioi_discovery" else f"{name}_curves.png"), model)


def _exact(ev, scores: dict, per_method: int, out: dict) -> None:
    exact = exact_effects(ev, scores, per_method)
    names = list(exact)
    ex = np.array([exact[e] for e in names])
    out["exact"] = {"n_edges": len(names), "per_method": per_method, "effects": exact, "spearman": {}}
    for label, sc in scores.items():
        est = np.array([sc.as_dict()[e] for e in names])
        out["exact"]["spearman"][label] = spearman(est, ex)


def _figure(curves: dict, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, ranking in zip(axes, ("signed", "absolute")):
        for label, pair in curves.items():
            c = getattr(pair, ranking)
            area = f"CPR {pair.cpr:.2f}" if ranking == "signed" else f"CMD {pair.cmd:.2f}"
            c.plot(ax=ax, label=f"{label} ({area})")
        ax.set_title(f"{'signed ranking (CPR)' if ranking == 'signed' else '|score| ranking (CMD)'}", fontsize=9)
    fig.suptitle(f"IOI on {model}: faithfulness of the top-n edges, MIB's rules", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    plt.close(fig)


def _scatter(scores: dict, exact: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(exact)
    ex = np.array([exact[e] for e in names])
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 3.2), sharey=True)
    for ax, (label, sc) in zip(axes, scores.items()):
        est = np.array([sc.as_dict()[e] for e in names])
        ax.scatter(ex, est, s=6, alpha=0.6)
        lim = max(np.abs(ex).max(), np.abs(est).max()) * 1.05
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.7, ls="--")
        ax.set_title(f"{label}\nSpearman {spearman(est, ex):.2f}", fontsize=8)
        ax.set_xlabel("exact effect (logit diff)", fontsize=8)
    axes[0].set_ylabel("attribution score", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    plt.close(fig)


def _se(point: dict) -> str:
    se = point["faithfulness_se"]
    return "" if se is None else f" ± {se:.3f}"


def _markdown(out: dict) -> str:
    fmt = lambda v: "undefined" if v is None else f"{v:.3f}"
    lines = [f"# IOI discovery on {out['model']}", "",
             f"{out['n_rows']} rows; {out['n_edges']:,} edges; clean logit difference {out['clean_logit_diff']:.3f}, "
             f"ablated {out['ablated_logit_diff']:.3f}. Produced by `python studies/smollm2_ioi_discovery.py` "
             f"in {out['seconds']:.0f} s.", "",
             "| method | attribution (s, rows) | CPR (signed) | CMD (|score|) | Spearman vs exact |", "|---|---|---|---|---|"]
    for label, m in out["methods"].items():
        rho = out.get("exact", {}).get("spearman", {}).get(label)
        lines.append(f"| {label} | {m['attribution_seconds']:.1f} ({m.get('attribution_rows', out['n_rows'])}) | {fmt(m['cpr']) if 'cpr' in m else 'not run'} | {fmt(m['cmd']) if 'cmd' in m else 'not run'} | "
                     f"{'not measured' if rho is None else f'{rho:.2f}'} |")
    lines += ["", "Faithfulness per point (edges requested → evaluated after pruning: faithfulness ± s.e.):", ""]
    for label, m in out["methods"].items():
        for ranking in [r for r in ("signed", "absolute") if r in m]:
            pts = "; ".join(f"{p['edges_requested']}→{p['edges_evaluated']}: {fmt(p['faithfulness'])}{_se(p)}"
                            for p in m[ranking]["points"])
            lines.append(f"- {label}, {ranking}: {pts}")
    if "default_selection" not in out:
        return "\n".join(lines) + "\n"
    lines += ["", "## Default selection (`discover` without --top-n)", "",
              "| method | ranking chosen | edges (% of the model) | faithfulness (these rows) | held out: faithfulness | "
              "necessity | selection (s) | attribution (s) |", "|---|---|---|---|---|---|---|---|"]
    for label, d in out["default_selection"].items():
        h = d["held_out"]
        lines.append(f"| {label} | {d['ranking']} | {d['n_edges']} ({100 * d['fraction']:.2f}%) | {fmt(d['faithfulness'])} | "
                     f"{fmt(h['faithfulness'])} ± {fmt(h['faithfulness_se'])} | {fmt(h['necessity'])} ± {fmt(h['necessity_se'])} | "
                     f"{d['seconds']:.1f} | {d['attribution_seconds']:.1f} |")
    lines += [""] + [f"- {label}: {d['how']}" for label, d in out["default_selection"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
