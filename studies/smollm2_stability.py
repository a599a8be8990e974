"""How sure we are of each edge of SmolLM2-135M's IOI circuit: by-position scores, bootstrap stability, held-out rows.

One command reproduces every number of ``studies/results/smollm2_stability.{json,md,png}``::

    python studies/smollm2_stability.py [--model smollm2-135m-q4] [-n 32] [--steps 5] [-B 20]

What it runs, on ``-n`` IOI rows (``make-data ioi``, seed 0) and as many held-out rows (seed 1):

* EAP-IG (``--steps`` steps) plain and by position; both curves at the same numbers of scored units (an edge,
  or an edge at one span), MIB's pruning, each point with its standard error: does spending units on
  positions buy faithfulness?
* ``-B`` bootstrap resamples of the rows, each scored and cut at the top ``--fraction`` of the edges (pruned as
  MIB prunes): every edge's inclusion frequency and the mean pairwise Jaccard of the resampled circuits.  The
  bootstrap runs EAP-IG when ``B`` times the measured EAP-IG attribution fits ``--budget-min`` minutes, else EAP
  (the results say which and why);
* the stability-selected circuits (edges in >= pi of the resamples) against the plain top-n circuit of the same
  size, both on the held-out rows, with standard errors and the paired standard error of their difference.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAME = "smollm2_stability"
UNITS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # fractions of the model's edges, as units
PIS = (0.5, 0.8, 1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-q4")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("-B", type=int, default=20, help="bootstrap resamples")
    ap.add_argument("--fraction", type=float, default=0.1, help="the bootstrap's circuits: top this fraction of the edges")
    ap.add_argument("--budget-min", type=float, default=25.0, help="EAP-IG for the bootstrap only if it fits this many minutes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from circuitgraph.discovery import discover
    from circuitgraph.discovery.selection import SizeRule
    from circuitgraph.discovery.stability import bootstrap
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.model.loading import load_model
    from smollm2_ioi_discovery import _data as ioi_rows

    RESULTS.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    model = load_model(args.model)
    ev, held = Evaluator(model, ioi_rows(model, args.n, 0)), Evaluator(model, ioi_rows(model, args.n, 1))
    n_edges = model.graph.n_edges
    out: dict = {"model": args.model, "quantization": getattr(model, "quantization", None), "n_rows": args.n,
                 "n_edges": n_edges, "steps": args.steps, "load_average": os.getloadavg()[0],
                 "clean_logit_diff": float(ev.clean_values.mean()), "ablated_logit_diff": float(ev.base_values.mean())}
    print(f"{args.model}: {n_edges} edges; clean logit diff {out['clean_logit_diff']:.3f}, ablated {out['ablated_logit_diff']:.3f}")

    # 1. plain vs by-position EAP-IG at equal numbers of units
    scores = {"plain": discover(ev, "eap-ig", steps=args.steps), "by position": discover(ev, "eap-ig", steps=args.steps, by_position=True)}
    units = [int(f * n_edges) for f in UNITS]
    out["units"] = units
    out["curves"] = {}
    for label, sc in scores.items():
        t = time.perf_counter()
        out["curves"][label] = {"attribution_seconds": sc.meta["seconds"], "n_units_total": sc.n_units, "spans": sc.spans,
                                **equal_unit_curve(ev, sc, units), "curve_seconds": time.perf_counter() - t}
        print(f"{label}: attribution {sc.meta['seconds']:.0f}s, curve {out['curves'][label]['curve_seconds']:.0f}s")
        _save(out, t0)

    # 2. bootstrap: EAP-IG if B of its runs fit the budget, else EAP
    one = scores["plain"].meta["seconds"]
    method = "eap-ig" if args.B * one <= 60 * args.budget_min else "eap"
    out["bootstrap"] = {"method": method, "B": args.B, "eap_ig_one_resample_s": one,
                        "why": f"{args.B} EAP-IG resamples estimated at {args.B * one / 60:.1f} min from one "
                               f"({one:.0f} s), {'within' if method == 'eap-ig' else 'over'} the {args.budget_min:g} min budget"}
    print(out["bootstrap"]["why"], "->", method)
    plain = scores["plain"] if method == "eap-ig" else discover(ev, method)
    n = int(args.fraction * n_edges)
    rule = SizeRule("top_n", n, prune=True)
    t = time.perf_counter()
    stab = bootstrap(ev, method, rule, args.B, steps=args.steps)
    held_in = stab.edge_counts[ev.graph.legal]  # per edge: how many resamples kept it
    by_count = torch.bincount(held_in, minlength=args.B + 1).tolist()
    out["bootstrap"].update(seconds=time.perf_counter() - t, top_n=n, jaccard=stab.jaccard, sizes=stab.sizes,
                            n_edges_ever=int((held_in > 0).sum()), edges_by_count=by_count[1:], n_always=by_count[-1])
    _save(out, t0)

    # 3. stability-selected vs plain top-n of the same size, on the held-out rows
    out["held_out"] = compare_on_held(ev, held, plain, rule, stab)
    _save(out, t0)
    _figure(out, RESULTS / f"{NAME}.png")
    print(f"wrote {RESULTS / (NAME + '.md')} in {out['seconds']:.0f}s")
    return 0


def equal_unit_curve(ev, scores, units: list[int]) -> dict:
    """Faithfulness ± s.e. of the top-k units by |score| (pruned as MIB prunes) for each k in ``units``: the
    curve machinery of MIB's rules, at fractions of this ranking's own units that land on k."""
    from circuitgraph.discovery.curves import faithfulness_curve

    fractions = [(k + 0.5) / scores.n_units for k in units]  # floor(f * n_units) = k
    pair = faithfulness_curve(ev, scores, fractions=fractions)
    c = pair.absolute
    assert list(c.n_requested) == units, (list(c.n_requested), units)
    return {"faithfulness": c.faithfulness.tolist(), "faithfulness_se": c.faithfulness_se.tolist(),
            "units_evaluated": c.n_edges.tolist(), "signed_faithfulness": pair.signed.faithfulness.tolist()}


def compare_on_held(ev, held, plain, rule, stab) -> dict:
    """The bootstrap rule's own circuit, each stable circuit (edges in >= pi of the resamples) and the plain top-n of
    its size (pruned): faithfulness on the rows the scores came from and on the held-out rows (with the drop and its
    flag, :func:`circuitgraph.evaluate.holdout.compare`), and the paired s.e. of the held-out stable - plain difference."""
    from circuitgraph.discovery.curves import ranked_top_n
    from circuitgraph.discovery.edge_scores import mib_prune
    from circuitgraph.evaluate.evaluator import bootstrap_se, normalised
    from circuitgraph.evaluate.holdout import compare

    def scored(mask) -> dict:
        c = plain.circuit(mask)
        h = compare(ev.evaluate(c), held.evaluate(c), "held-out rows")
        return {"n_edges": int(mask.sum()), "found": h.found.faithfulness, "found_se": h.found.faithfulness_se,
                "held": h.held.faithfulness, "held_se": h.held.faithfulness_se, "drop": h.drop, "drop_se": h.drop_se,
                "flagged": h.flagged}

    def top_of_size(scores, size: int):
        """The smallest top-n by |score| that keeps ``size`` edges (or more) after MIB's pruning."""
        n = size
        while int((m := mib_prune(ev.graph, ranked_top_n(scores, n, "absolute"))).sum()) < size and n < scores.n_units:
            n += size - int(m.sum())
        return m

    out = {"rule": scored(rule.mask(plain)), "rows": []}
    for pi in PIS:
        mask = stab.stable(pi)
        if not mask.any():
            out["rows"].append({"pi": pi, "stable": None})
            continue
        match = top_of_size(plain, int(mask.sum()))
        row = {"pi": pi, "stable": scored(mask), "plain": scored(match)}
        a, b = held.circuit_values(plain.circuit(mask)), held.circuit_values(plain.circuit(match))
        row["held_difference_se"] = bootstrap_se(lambda a, b, c, z: normalised(a, c, z) - normalised(b, c, z),
                                                 a, b, held.clean_values, held.base_values)
        out["rows"].append(row)
        print(f"pi {pi:g}: {row['stable']['n_edges']} edges; held out stable {row['stable']['held']:.3f} ± "
              f"{row['stable']['held_se']:.3f}, plain top-n {row['plain']['held']:.3f} ± {row['plain']['held_se']:.3f}")
    return out


def _save(out: dict, t0: float) -> None:
    out["seconds"] = time.perf_counter() - t0
    (RESULTS / f"{NAME}.json").write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    (RESULTS / f"{NAME}.md").write_text(_markdown(out))


def _figure(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    ax = axes[0]
    for label, c in out["curves"].items():
        f, se = np.array(c["faithfulness"]), np.array(c["faithfulness_se"])
        line, = ax.plot(out["units"], f, marker="o", label=f"EAP-IG {label} ({c['n_units_total']:,} units)")
        ax.fill_between(out["units"], f - se, f + se, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xscale("log")
    ax.axhline(1, color="grey", lw=0.7, ls="--"), ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("units kept (edges, or edge x position spans), top |score|, pruned"), ax.set_ylabel("faithfulness")
    ax.set_title("plain vs by-position EAP-IG at equal units (± s.e.)", fontsize=9), ax.legend(fontsize=8)
    b = out["bootstrap"]
    ax = axes[1]
    k = np.arange(1, b["B"] + 1)
    ax.bar(k / b["B"], b["edges_by_count"], width=0.8 / b["B"], color="#5e3c99")
    ax.set_xlabel(f"inclusion frequency (kept in k of {b['B']} resamples)"), ax.set_ylabel("edges")
    jac = "undefined" if b["jaccard"] is None else f"{b['jaccard']:.3f}"
    ax.set_title(f"{b['B']} resamples, {b['method'].upper()} top {b['top_n']:,} pruned: Jaccard {jac}", fontsize=9)
    ax = axes[2]
    rows = [r for r in out["held_out"]["rows"] if r["stable"]]
    x = np.arange(len(rows))
    for k, (key, label, color) in enumerate((("stable", "stability-selected", "#5e3c99"),
                                             ("plain", "plain top-n, pruned to the same size", "#999999"))):
        ax.errorbar(x + (k - 0.5) * 0.2, [r[key]["held"] for r in rows], yerr=[r[key]["held_se"] for r in rows],
                    fmt="o", color=color, capsize=3, label=label)
    rule = out["held_out"]["rule"]
    ax.axhline(rule["held"], color="#c51b1b", lw=0.8, ls="--",
               label=f"the rule's top {b['top_n']:,} ({rule['n_edges']:,} after pruning)")
    ax.set_xticks(x, [f"pi = {r['pi']:g}\n{r['stable']['n_edges']:,} edges" for r in rows], fontsize=8)
    ax.set_ylabel("faithfulness on held-out rows"), ax.legend(fontsize=7, loc="best")
    ax.set_title("held-out faithfulness at equal size (± s.e.)", fontsize=9)
    fig.suptitle(f"IOI on {out['model']}, {out['n_rows']} rows (held out: {out['n_rows']} more)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    plt.close(fig)


def _markdown(out: dict) -> str:
    fmt = lambda v, se=None: "undefined" if v is None else f"{v:.3f}" + ("" if se is None else f" ± {se:.3f}")
    lines = [f"# How sure we are of each edge: {out['model']}, IOI", "",
             f"{out['n_rows']} rows (and {out['n_rows']} held out); {out['n_edges']:,} edges; clean logit difference "
             f"{out['clean_logit_diff']:.3f}, ablated {out['ablated_logit_diff']:.3f}; EAP-IG {out['steps']} steps. Produced by "
             f"`python studies/{NAME}.py` in {out['seconds']:.0f} s (load average {out['load_average']:.1f} on 2 cores).", "",
             "## Plain vs by-position EAP-IG at equal numbers of units", "",
             "Top-k units by |score|, pruned as MIB prunes (faithfulness ± s.e.):", "",
             "| units k | " + " | ".join(out["curves"]) + " |", "|---|" + "---|" * len(out["curves"])]
    for i, k in enumerate(out["units"]):
        lines.append(f"| {k:,} | " + " | ".join(fmt(c["faithfulness"][i], c["faithfulness_se"][i]) for c in out["curves"].values()) + " |")
    lines += [""] + [f"- {label}: {c['n_units_total']:,} units, attribution {c['attribution_seconds']:.0f} s, curve {c['curve_seconds']:.0f} s"
                     for label, c in out["curves"].items()]
    if "bootstrap" in out:
        b = out["bootstrap"]
        lines += ["", f"## Bootstrap ({b['B']} resamples of the rows, {b['method'].upper()})", "", f"{b['why']}.", ""]
        if "jaccard" in b:
            lines += [f"Circuits: top {b['top_n']:,} edges, pruned; sizes after pruning {min(b['sizes']):,}-{max(b['sizes']):,}. "
                      f"Mean pairwise Jaccard {fmt(b['jaccard'])}; {b['n_edges_ever']:,} edges kept in some resample, "
                      f"{b['n_always']:,} in all. Edges kept in exactly k = 1, 2, ... resamples: {b['edges_by_count']}. "
                      f"{b['seconds']:.0f} s.", ""]
    if "held_out" in out:
        r = out["held_out"]["rule"]
        lines += ["## Stability-selected vs plain top-n of the same size", "",
                  f"The bootstrap's rule on all rows (top {out['bootstrap']['top_n']:,}, {r['n_edges']:,} edges after pruning): "
                  f"faithfulness {fmt(r['found'], r['found_se'])} on the rows it was found on, {fmt(r['held'], r['held_se'])} "
                  f"held out (drop {fmt(r['drop'], r['drop_se'])}{', flagged' if r['flagged'] else ''}).", "",
                  "| circuit | edges | found rows | held out | held-out drop | held out, stable - plain ± paired s.e. |",
                  "|---|---|---|---|---|---|"]
        for row in out["held_out"]["rows"]:
            if not row["stable"]:
                lines.append(f"| edges in >= {row['pi']:g} of the resamples | 0 | | | | |")
                continue
            for key, name in (("stable", f"edges in >= {row['pi']:g} of the resamples"), ("plain", "plain top-n, pruned to that size")):
                c = row[key]
                diff = (fmt(row["stable"]["held"] - row["plain"]["held"], row["held_difference_se"]) if key == "stable" else "")
                lines.append(f"| {name} | {c['n_edges']:,} | {fmt(c['found'], c['found_se'])} | {fmt(c['held'], c['held_se'])} | "
                             f"{fmt(c['drop'], c['drop_se'])}{' (flagged)' if c['flagged'] else ''} | {diff} |")
        lines += ["", f"![stability]({NAME}.png)", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
