"""The IOI circuit of SmolLM2-135M-Instruct, found as Wang et al. (2022) found GPT-2 small's.

    python studies/smollm2_ioi_circuit.py [--model smollm2-135m-q4] [-n 24] [--n-eval 32] [--node-effects]
    python studies/smollm2_ioi_circuit.py --replot     # redraw figures and report from the saved JSON

Procedure (every step is circuitgraph's own API; effects are path-patching effects normalised to
the whole clean-corrupted logit-difference gap, so -1 = the full corruption effect):

1. path patching from every head and MLP to ``logits``: the heads selected are classed by the sign
   of their effect and by what END attends (``stage1_class``): IO and raising the logit difference
   (negative effect) = **name movers**, IO and lowering it = **negative name movers**; attending the
   subject instead = **S-suppression** (raising it) or **subject movers** (lowering it); attending
   none of the names = **other direct heads**; each checked with direct logit attribution (same sign);
2. path patching to the queries of the name movers and S-suppression heads at END: **S-inhibition**
   heads (checked: END attends S2);
3. path patching to the S-inhibition heads' keys and values at S2: heads attending S2 -> S1+1 are
   **induction** heads, heads attending S2 -> S1 **duplicate-token** heads (also scored as head types
   on repeated random tokens);
4. path patching to the induction heads' keys at S1+1: **previous-token** heads (checked: S1+1
   attends S1).

Stages 2-4 first patch every sender at all positions (the trials stack in one pass), then the
``--confirm`` largest heads again at the stage's positions only (position-restricted trials run one
at a time and cost several times more on a CPU); selection uses the position-restricted effects.
Selection rule, the same at every stage (no hand-picking): a head joins a stage's classes when its
effect has the stage's sign, |effect| >= ``THRESHOLD`` (2% of the total clean-corrupted gap),
|effect| >= ``MIN_Z`` bootstrap standard errors, and it is among the ``TOP_K`` largest; a head
already in an earlier class stays there.

The classes become circuit specs with the GPT-2 IOI spec's structure (groups at their positions,
class-to-class ports), with and without every MLP as an extended embedding, and the node circuits
of the same heads; each is scored with the Evaluator on held-out rows (another seed): faithfulness,
necessity, and for the shipped one each group's removal.  Shipped (``specs/ioi_smollm2.json``): the
most specific of them whose faithfulness is within 2 combined standard errors of the best.

Writes studies/results/smollm2_ioi_circuit.{json,md}, smollm2_ioi_path_patching.png (the stages'
layer x head heatmaps, DLA and the classes) and smollm2_ioi_circuit.png (the spec, classes collapsed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "studies" / "results"
SPEC_OUT = ROOT / "circuitgraph" / "specs" / "ioi_smollm2.json"  # specs/ is a link to this folder

THRESHOLD = 0.02  # |effect| >= 2% of the total clean-corrupted logit-difference gap
MIN_Z = 2.0  # and at least two bootstrap standard errors from zero
TOP_K = 8  # at most this many heads per class
SOURCE = "found by studies/smollm2_ioi_circuit.py; method of Wang et al. 2022"
PAPER = ("Wang, Variengien, Conmy, Shlegeris, Steinhardt (2022). Interpretability in the Wild: a Circuit for "
         "Indirect Object Identification in GPT-2 small. arXiv:2211.00593")

T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f}s] {msg}", flush=True)


def head_name(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def lh(name: str) -> tuple[int, int]:
    layer, head = name[1:].split(".h")
    return int(layer), int(head)


# ----- attention ----------------------------------------------------------------------------
def attention_between(pats: torch.Tensor, data, query: str, key: str) -> torch.Tensor:
    """``[L, H]`` mean attention from the named query position to the named key position."""
    idx = torch.arange(len(data))
    return pats[:, idx, :, data.positions[query], data.positions[key]].mean(0)  # advanced dims first: [N, L, H]


# ----- selection ----------------------------------------------------------------------------
def select(result, sign: int, taken: set[str], screen=None) -> tuple[list[str], list[dict]]:
    """Heads of ``result`` passing the selection rule (module docstring), largest |effect| first, and
    the rows of the 12 largest (passing or not) for the report, with the screen's effect when the
    selection used a position-restricted result."""
    rows = []
    for name, eff in result.senders.items():
        if not name.startswith("a") or not math.isfinite(eff):
            continue
        row = {"head": name, "effect": eff, "se": result.senders_se[name]}
        if screen is not None:
            row["screen_effect"], row["screen_se"] = screen.senders[name], screen.senders_se[name]
        rows.append(row)
    rows.sort(key=lambda r: -abs(r["effect"]))
    chosen = []
    for r in rows:
        ok_sign = r["effect"] * sign > 0
        ok_size = abs(r["effect"]) >= THRESHOLD
        ok_z = r["se"] is not None and math.isfinite(r["se"]) and abs(r["effect"]) >= MIN_Z * r["se"]
        r["passes"] = bool(ok_sign and ok_size and ok_z and r["head"] not in taken and len(chosen) < TOP_K)
        if r["head"] in taken and ok_sign and ok_size and ok_z:
            r["note"] = "already in an earlier class"
        elif ok_sign and ok_size and ok_z and not r["passes"]:
            r["note"] = f"beyond the top {TOP_K}"
        if r["passes"]:
            chosen.append(r["head"])
    return chosen, rows[:12]


def sweep(model, data, ev, receivers, positions, label, n_confirm):
    """Path patching from every upstream head and MLP to ``receivers`` (the screen, at every position:
    its trials stack in one pass), then, when the stage names ``positions``, again at those positions
    for the ``n_confirm`` heads with the largest screened |effect| (position-restricted trials run one
    at a time, several times slower).  Returns (screen, positional or None, seconds)."""
    from circuitgraph.evaluate.path_patching import path_patch_sweep

    t = time.time()
    say(f"{label}: path patching every upstream head and MLP -> {len(receivers)} receiver(s), all positions ...")
    screen = path_patch_sweep(model, data, receivers, evaluator=ev)
    say(f"{label}: screened in {time.time() - t:.0f}s; largest: "
        + ", ".join(f"{n} {e:+.3f}" for n, e in screen.top(6)))
    if not positions:
        return screen, None, time.time() - t
    cand = [n for n, e in screen.top(len(screen.senders)) if n.startswith("a")][:n_confirm]
    if not cand:  # no head upstream of the receivers
        return screen, None, time.time() - t
    say(f"{label}: the top {len(cand)} heads again, patched at {','.join(positions)} only ...")
    at = path_patch_sweep(model, data, receivers, senders=cand, positions=positions, evaluator=ev)
    say(f"{label}: done in {time.time() - t:.0f}s; at {','.join(positions)}: "
        + ", ".join(f"{n} {e:+.3f}" for n, e in at.top(6)))
    return screen, at, time.time() - t


# ----- the spec -------------------------------------------------------------------------------
ATTN_MIN = 0.1  # a stage-1 head "attends the names" when END puts at least this much on IO, S1 and S2 together
NAMES_KV = ["IO", "S1", "S2"]
CLASS_INFO = {  # class -> (its position, what its heads do)
    "name movers": ("END", "attend from END to IO and raise the logit difference: they copy the indirect "
                           "object's name into the logits (DLA positive)"),
    "negative name movers": ("END", "attend from END to IO and lower the logit difference: they write against "
                                    "the name they attend (DLA negative)"),
    "S-suppression": ("END", "attend from END to the subject (S1, S2) and raise the logit difference: they write "
                             "against the subject's name"),
    "subject movers": ("END", "attend from END to the subject (S1, S2) and lower the logit difference: they copy "
                              "the subject's name"),
    "other direct heads": ("END", "path to the logits above the threshold, but END attends to none of IO, S1, S2 "
                                  f"(< {ATTN_MIN:g} together)"),
    "S-inhibition": ("END", "at END, move the duplicated-subject signal from S2 into the name movers' queries"),
    "induction": ("S2", "at S2, attend to S1+1 (the token after the subject's first occurrence)"),
    "duplicate token": ("S2", "at S2, attend to S1 (the earlier copy of the same token)"),
    "previous token": ("S1+1", "at S1+1, attend to S1 and write it into the induction heads' keys"),
}
COLORS = {"S-suppression": "#fccde5", "subject movers": "#bc80bd", "other direct heads": "#ccebc5"}  # the rest: render's role colours
MOVERS = ["name movers", "negative name movers", "S-suppression", "subject movers"]  # attend names from END
STAGE1 = MOVERS + ["other direct heads"]
WANG_CLASSES = ["name movers", "negative name movers", "S-inhibition", "induction", "duplicate token", "previous token"]


def stage1_class(effect: float, to_io: float, to_s: float) -> str:
    """The class of a head selected by path patching to the logits: by the sign of its effect (negative:
    its path raises the logit difference) and by what END attends (IO, the subject, or neither)."""
    if to_io + to_s < ATTN_MIN:
        return "other direct heads"
    if to_io >= to_s:
        return "name movers" if effect < 0 else "negative name movers"
    return "S-suppression" if effect < 0 else "subject movers"


def build_spec(classes: dict[str, list[str]], name="IOI circuit (SmolLM2-135M)", positional=True, mlps=0):
    """The GPT-2 IOI spec's structure (scripts/make_reference_specs.py) over the classes found.

    ``mlps`` = the model's number of layers adds every MLP as a group ``MLPs`` read like the token
    embedding: wherever ``input`` feeds a class, the MLPs feed it on the same ports and positions, the
    MLPs read the input, each other and every class (at its positions), and they write to the logits."""
    from circuitgraph.spec.circuit_spec import CircuitSpec

    what = ("MLPs are part of it as an extended embedding: every MLP, read wherever the token embedding is."
            if mlps else "MLPs are not part of it, so under edge patching they are ablated.")
    s = CircuitSpec(name=name, model="smollm2-135m-q4", task="ioi", source=SOURCE,
                    description="IOI circuit of SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), found with path "
                                "patching, attention patterns and direct logit attribution as in " + PAPER + ". " + what)
    present = {c: nodes for c, nodes in classes.items() if nodes}
    for c, nodes in present.items():
        pos, desc = CLASS_INFO[c]
        s.group(c, nodes, positions=[pos] if positional else None, description=desc, color=COLORS.get(c))
    if mlps:
        s.group("MLPs", [f"m{l}" for l in range(mlps)],
                description="every MLP, at every position: the residual processing the heads read and write")
    if not positional:
        return s  # a node circuit: every edge among the groups' nodes, input and logits
    base = ["input", "MLPs"] if mlps else ["input"]

    def embed(dst, ports, positions):
        for src in base:
            if src == "MLPs" and all(lh(h)[0] == 0 for h in present[dst]):
                continue  # no MLP is upstream of a layer-0 head
            s.connect(src, dst, ports, positions=positions)

    for g in [c for c in MOVERS if c in present]:
        if "S-inhibition" in present:
            s.connect("S-inhibition", g, "q")  # the S-inhibition signal steers their queries at END
        embed(g, "q", ["END"])
        embed(g, "kv", NAMES_KV)  # they attend to and copy names
        s.connect(g, "logits")
    if "other direct heads" in present:
        embed("other direct heads", "qkv", None)
        s.connect("other direct heads", "logits")
    if "S-inhibition" in present:
        for src in ("induction", "duplicate token"):
            if src in present:
                s.connect(src, "S-inhibition", "kv")  # read at S2 (the sources' position) through keys and values
        embed("S-inhibition", "qk", ["END", "S2"])
        embed("S-inhibition", "v", ["S2"])
    if "induction" in present:
        if "previous token" in present:
            s.connect("previous token", "induction", "k")  # K-composition at S1+1
        embed("induction", "qkv", ["S2", "S1+1"])
    if "duplicate token" in present:
        embed("duplicate token", "qkv", ["S1", "S2"])
    if "previous token" in present:
        embed("previous token", "qkv", ["S1", "S1+1"])
    if mlps:
        s.connect("input", "MLPs")
        s.connect("MLPs", "MLPs")
        for c in present:
            s.connect(c, "MLPs")  # at the class's positions
        s.connect("MLPs", "logits")
    return s


def without_class(spec, cls: str):
    """The spec with one class's group and every connection touching it removed."""
    from circuitgraph.spec.circuit_spec import CircuitSpec

    d = json.loads(spec.to_json())
    d["groups"].pop(cls)
    d["connections"] = [c for c in d["connections"] if cls not in (c["src"], c["dst"])]
    return CircuitSpec.from_dict(d)


def score_dict(sc) -> dict:
    keys = ("n_examples", "n_edges", "n_edges_total", "clean_metric", "corrupted_metric", "circuit_metric",
            "complement_metric", "faithfulness", "faithfulness_se", "necessity", "necessity_se", "undefined_reason")
    return {k: getattr(sc, k) for k in keys}


def class_removals(ev, spec) -> dict:
    """Faithfulness drop (with the bootstrap s.e. of the paired difference) when one group is removed."""
    from circuitgraph.evaluate.evaluator import bootstrap_se, normalised

    names = list(spec.groups)
    reduced = [without_class(spec, c) for c in names]
    clean, base = ev.clean_values, ev.base_values
    kept = [i for i, r in enumerate(reduced) if not r.is_empty]
    got = ev.metric_values([ev.resolve(spec)] + [ev.resolve(reduced[i]) for i in kept], desc="class removals")
    vals = np.repeat(base[None], len(names) + 1, axis=0)  # a spec left empty is the corrupted run
    vals[0] = got[0]
    vals[[i + 1 for i in kept]] = got[1:]
    out = {}
    drop = lambda f, r, c, b: normalised(f, c, b) - normalised(r, c, b)
    for c, row in zip(names, vals[1:]):
        out[c] = {"faithfulness_without": float(normalised(row, clean, base)),
                  "drop": float(drop(vals[0], row, clean, base)),
                  "drop_se": bootstrap_se(drop, vals[0], row, clean, base)}
    return out


# ----- figure -------------------------------------------------------------------------------
def grid_of(values: dict[str, float], n_layers: int, n_heads: int) -> torch.Tensor:
    """``[n_layers, n_heads + 1]`` of per-node values (heads, then the MLP column); NaN where absent."""
    grid = torch.full((n_layers, n_heads + 1), float("nan"))
    for name, v in values.items():
        if name.startswith("a"):
            grid[lh(name)] = v
        elif name.startswith("m"):
            grid[int(name[1:]), n_heads] = v
    return grid


def plot_stages(out: dict, path: Path) -> Path:
    """One layer x head panel per stage (the all-position screen; boxed: the heads selected, with the
    effect they were selected on), one of direct logit attribution and the classes found; from the
    study's JSON alone, so ``--replot`` redraws it without recomputing."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from circuitgraph.plots import heatmap, save

    L, H = out["graph"]["n_layers"], out["graph"]["n_heads"]
    panels = []
    for st in out["stages"]:
        screen = {n: v[0] for n, v in st["screen_all_positions"].items()}
        panels.append((st["title"], grid_of(screen, L, H), {h: out["heads"][h]["effect"] for h in st["selected"]},
                       "path-patching effect (-1 = full corruption)"))
    panels.append(("direct logit attribution\n(each head's direct share of the clean logit diff)",
                   grid_of({**out["dla"]["heads"], **out["dla"]["mlps"]}, L, H), {}, "logit diff"))
    ncol = 3
    nrow = -(-(len(panels) + 1) // ncol)
    fig = Figure(figsize=(5.6 * ncol, 8.0 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).flatten()
    for ax, (title, grid, chosen, cbar) in zip(axes, panels):
        heatmap(fig, ax, grid, [f"L{i}" for i in range(L)], [f"h{h}" for h in range(H)] + ["mlp"],
                diverging=True, title=title, xlabel="head   (grey: not upstream of the receivers)", ylabel="layer",
                cbar_label=cbar, origin_lower=True, annotate=False)
        ax.axvline(H - 0.5, color="black", lw=1.2)
        for name, eff in chosen.items():
            layer, head = lh(name)
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="black", lw=2.0))
            ax.text(head, layer, f"{eff:+.2f}", ha="center", va="center", fontsize=6.5, color="black",
                    bbox=dict(boxstyle="square,pad=0.08", fc="white", ec="none", alpha=0.85))
    text_ax = axes[len(panels)]
    text_ax.axis("off")
    lines = ["Classes found (effect the head was selected on):", ""]
    for c, heads in out["classes"].items():
        if heads:
            lines.append(f"{c}:")
            lines += [f"    {h}  {out['heads'][h]['effect']:+.3f} ± {out['heads'][h]['effect_se']:.3f}" for h in heads]
    lines += ["", "Stage 1 classes by what END attends", f"(IO, or S1+S2, >= {ATTN_MIN:g} together) and by sign;",
              "stage 3 heads: induction if S2 attends S1+1", "more than S1, else duplicate token."]
    text_ax.text(0.02, 0.98, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=10,
                 transform=text_ax.transAxes)
    for ax in axes[len(panels) + 1:]:
        ax.set_visible(False)
    fig.suptitle(f"IOI in SmolLM2-135M: path patching on {out['discovery']['n']} prompts, every sender patched at all "
                 f"positions. Boxed: the heads selected, labelled with the effect they were selected on\n"
                 f"(at the stage's positions for stages 2-4; rule: |effect| >= {THRESHOLD:g}, >= {MIN_Z:g} s.e., "
                 f"the stage's sign, top {TOP_K})", fontsize=12)
    return save(fig, path, dpi=110)


def draw(out: dict, spec_path: Path, folder: Path) -> None:
    """Both figures, from the study's JSON and the shipped spec."""
    from circuitgraph.graph.computational_graph import Graph
    from circuitgraph.render import render
    from circuitgraph.spec.circuit_spec import CircuitSpec

    plot_stages(out, folder / "smollm2_ioi_path_patching.png")
    spec = CircuitSpec.load(spec_path)
    e = out["evaluation"]
    sv = e["variants"][e["shipped"]]
    title = (f"IOI circuit of SmolLM2-135M, head classes collapsed: faithfulness "
             f"{pm(sv['faithfulness'], sv['faithfulness_se'], 2)} on {e['n']} held-out prompts")
    if "MLPs" in spec.groups:  # every MLP reads and feeds every class: drawn, its edges hide the classes' wiring
        spec = without_class(spec, "MLPs")
        title += "\n(the spec also keeps every MLP, read wherever the embedding is and reading every class: not drawn)"
    render(spec, Graph(out["graph"]["n_layers"], out["graph"]["n_heads"]), folder / "smollm2_ioi_circuit.png",
           collapse_groups=True, title=title)


# ----- report -------------------------------------------------------------------------------
def fmt(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.{nd}f}"


def pm(x, se, nd=3):
    if x is None:
        return "undefined"
    return f"{x:.{nd}f} ± {se:.{nd}f}" if se is not None else f"{x:.{nd}f}"


def write_markdown(out: dict, path: Path) -> None:
    L = []
    a = L.append
    a("# The IOI circuit of SmolLM2-135M-Instruct (path patching, Wang et al. 2022)\n")
    a(f"Model `{out['model']}`, {out['quantization']}; discovery on {out['discovery']['n']} IOI prompts "
      f"(seed {out['discovery']['seed']}), evaluation on {out['evaluation']['n']} held-out prompts "
      f"(seed {out['evaluation']['seed']}); ABC corruption. Written by `studies/smollm2_ioi_circuit.py`; "
      f"runtime {out['runtime_s']:.0f} s wall ({out['cpu_s']:.0f} s CPU) with {out['threads']} torch threads; "
      f"1-minute load average {out['load_average_at_start_and_end'][0][0]:.1f} at the start and "
      f"{out['load_average_at_start_and_end'][1][0]:.1f} at the end (other jobs shared the cores).\n")
    d = out["discovery"]
    a(f"Logit difference (IO - S at END) on the discovery prompts: clean {d['clean_logit_diff']:.2f}, "
      f"corrupted {d['corrupted_logit_diff']:.2f}. Path-patching effects are normalised to this gap "
      f"(-1 = the whole corruption effect).\n")
    a(f"Selection rule at every stage: effect of the stage's sign, |effect| >= {THRESHOLD:g}, "
      f">= {MIN_Z:g} bootstrap s.e., at most {TOP_K} heads, a head keeps its first class.\n")
    a("## Classes found\n")
    a("| class | head | path-patching effect ± s.e. | check | DLA | attention |")
    a("|---|---|---|---|---|---|")
    for c, heads in out["classes"].items():
        if not heads:
            if c in WANG_CLASSES:
                a(f"| {c} | *none passed the rule* | | | | |")
            continue
        for h in heads:
            info = out["heads"][h]
            att = ", ".join(f"{k} {v:.2f}" for k, v in info["attention"].items())
            a(f"| {c} | {h} | {info['effect']:+.3f} ± {info['effect_se']:.3f} | "
              f"{'ok' if info['check'] else 'FAILS: ' + info['check_reason']} | {info['dla']:+.2f} | {att} |")
    a("")
    for st in out["stages"]:
        a(f"### Stage {st['stage']}: {st['label']}\n")
        a(f"Receivers: `{', '.join(st['receivers'])}`" + (f" at {', '.join(st['positions'])}" if st['positions'] else "")
          + f"; {st['seconds']:.0f} s. Largest effects (heads):\n")
        if st["positions"]:
            a(f"| head | effect at {','.join(st['positions'])} ± s.e. | screen (all positions) ± s.e. | selected |")
            a("|---|---|---|---|")
            for r in st["top"]:
                a(f"| {r['head']} | {r['effect']:+.3f} ± {r['se']:.3f} | {r['screen_effect']:+.3f} ± {r['screen_se']:.3f} | "
                  f"{'yes' if r['passes'] else r.get('note', 'no')} |")
        else:
            a("| head | effect ± s.e. | selected |")
            a("|---|---|---|")
            for r in st["top"]:
                a(f"| {r['head']} | {r['effect']:+.3f} ± {r['se']:.3f} | {'yes' if r['passes'] else r.get('note', 'no')} |")
        if st["mlps"]:
            a("\nLargest MLP effects (screen): " + ", ".join(f"{m} {e:+.3f}" for m, e in st["mlps"]))
        a("")
    a("## Head-type scores on repeated random tokens (the classes' heads)\n")
    a("| head | class | previous-token | duplicate-token | induction |")
    a("|---|---|---|---|---|")
    for c, heads in out["classes"].items():
        for h in heads:
            s = out["heads"][h]["head_scores"]
            a(f"| {h} | {c} | {s['previous_token']:.2f} | {s['duplicate_token']:.2f} | {s['induction']:.2f} |")
    a("\nBest heads of each type in the whole model: " + "; ".join(
        f"{k}: " + ", ".join(f"{h} {v:.2f}" for h, v in top) for k, top in out["head_score_top"].items()) + "\n")
    e = out["evaluation"]
    a(f"## Evaluation on {e['n']} held-out prompts (seed {e['seed']})\n")
    a(f"Clean logit difference {e['clean_logit_diff']:.2f}, corrupted {e['corrupted_logit_diff']:.2f}. "
      f"Faithfulness = (M(circuit) - M(corrupted)) / (M(clean) - M(corrupted)); necessity = 1 - that of the "
      f"complement; ± bootstrap standard errors.\n")
    a("| circuit | edges | faithfulness | necessity |")
    a("|---|---|---|---|")
    for k, v in e["variants"].items():
        a(f"| {k} | {v['n_edges']} | {pm(v['faithfulness'], v['faithfulness_se'])} | {pm(v['necessity'], v['necessity_se'])} |")
    a(f"\nShipped: **{e['shipped']}** (`specs/ioi_smollm2.json`). {e['shipped_why']}\n")
    a("### Each group removed from the shipped spec\n")
    a("| group | faithfulness without it | drop ± s.e. |")
    a("|---|---|---|")
    for c, v in e["class_removals"].items():
        a(f"| {c} | {v['faithfulness_without']:.3f} | {v['drop']:+.3f} ± {v['drop_se']:.3f} |")
    if e.get("node_effects"):
        a("\n### Each head removed from the shipped spec (node effects: faithfulness drop ± s.e.)\n")
        a("| head | class | drop ± s.e. |")
        a("|---|---|---|")
        for h, v in e["node_effects"].items():
            a(f"| {h} | {v['class']} | {v['drop']:+.3f} ± {v['se']:.3f} |")
    a("\n## What is uncertain\n")
    for u in out["uncertain"]:
        a(f"- {u}")
    a("\nFigures: `smollm2_ioi_path_patching.png` (the stages' heatmaps and DLA), `smollm2_ioi_circuit.png` "
      "(the shipped spec, classes collapsed).")
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


# ----- main ---------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-q4", help="the named model, a .gguf file or its HF folder")
    ap.add_argument("-n", type=int, default=24, help="IOI prompts for discovery (path patching, attention, DLA)")
    ap.add_argument("--n-eval", type=int, default=32, help="held-out IOI prompts for the evaluation")
    ap.add_argument("--seed", type=int, default=0, help="seed of the discovery prompts")
    ap.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out prompts")
    ap.add_argument("--confirm", type=int, default=10,
                    help="heads measured again at the stage's positions (the largest of the all-position screen)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--node-effects", action="store_true",
                    help="also each head's effect (one position-restricted run per head: slow on a CPU)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--spec-out", type=Path, default=SPEC_OUT)
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the figures and the report from the JSON and spec an earlier run wrote")
    args = ap.parse_args(argv)
    if args.replot:
        out = json.loads((args.out / "smollm2_ioi_circuit.json").read_text())
        write_markdown(out, args.out / "smollm2_ioi_circuit.md")
        draw(out, args.spec_out, args.out)
        say(f"redrew the figures and the report in {args.out}")
        return 0
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # circuitgraph's notes (e.g. a spec written for another model name)

    from circuitgraph import Evaluator, load_dataset, load_model
    from circuitgraph.characterise.dla import direct_logit_attribution
    from circuitgraph.characterise.heads import all_patterns, detection_scores, repeated_tokens
    from circuitgraph.data.dataset import model_limits
    from circuitgraph.data.tasks import make_data
    from circuitgraph.spec.circuit_spec import CircuitSpec

    cpu0, load0 = time.process_time(), list(os.getloadavg())
    say(f"loading {args.model}")
    model = load_model(args.model)
    G = model.graph
    say(f"{G.n_layers} layers x {G.n_heads} heads, {G.n_edges} edges; quantization: {model.quantization}")
    data = load_dataset(make_data("ioi", model.tokenizer, args.n, seed=args.seed), model)
    held = load_dataset(make_data("ioi", model.tokenizer, args.n_eval, seed=args.eval_seed), model)
    overlap = {e.clean for e in data.examples} & {e.clean for e in held.examples}
    ev = Evaluator(model, data, progress=False)
    say(f"discovery: {len(data)} prompts, clean logit diff {ev.clean_values.mean():.2f}, "
        f"corrupted {ev.base_values.mean():.2f}; held out: {len(held)} prompts ({len(overlap)} shared with discovery)")

    # --- characterisation: attention on the IOI prompts, DLA, head types on repeated tokens ---
    say("attention patterns on the IOI prompts, direct logit attribution, head-type scores")
    pats = all_patterns(model, data.clean)  # [L, N, H, P, P]; right padding: real positions unaffected
    att = {f"{q}->{k}": attention_between(pats, data, q, k)
           for q, k in [("END", "IO"), ("END", "S1"), ("END", "S2"), ("S2", "S1"), ("S2", "S1+1"), ("S1+1", "S1")]}
    del pats
    dla = direct_logit_attribution(model, data)
    context = model_limits(model)[1] or 10**9  # a learned-position model's context (the bundled toys are short)
    rep = repeated_tokens(model, n=8, seq_len=min(20, (context - 1) // 2), seed=0)
    hs = {k: detection_scores(model, rep, k) for k in ("previous_token", "duplicate_token", "induction")}

    def top_of(t, k=4):
        idx = torch.argsort(t.flatten(), descending=True)[:k]
        return [(head_name(int(i) // G.n_heads, int(i) % G.n_heads), round(float(t.flatten()[i]), 3)) for i in idx]

    # --- the four path-patching stages ---
    classes: dict[str, list[str]] = {c: [] for c in CLASS_INFO}
    taken: set[str] = set()
    stages = []

    def stage(n, label, title, receivers, positions, sign, short):
        screen, at, secs = sweep(model, data, ev, receivers, positions, f"stage {n} ({short})", args.confirm)
        chosen, top = select(at if at is not None else screen, sign, taken, screen if at is not None else None)
        st = dict(stage=n, label=label, title=title, receivers=receivers, positions=positions, screen=screen, at=at,
                  seconds=secs, chosen=list(chosen), top=top)
        stages.append(st)
        return chosen, st

    r1, _, t1 = sweep(model, data, ev, ["logits"], None, "stage 1 (heads writing to the logits)", args.confirm)
    helps, top1 = select(r1, -1, taken)  # their path raises the logit difference
    hurts, top1n = select(r1, +1, taken)
    for h in helps + hurts:  # the class by sign and by what END attends
        l, hh = lh(h)
        to_io, to_s = float(att["END->IO"][l, hh]), float(att["END->S1"][l, hh] + att["END->S2"][l, hh])
        classes[stage1_class(r1.senders[h], to_io, to_s)].append(h)
    taken |= set(helps + hurts)
    stages.append(dict(stage=1, label="-> logits: heads that raise (-) or lower (+) the logit difference",
                       receivers=["logits"], positions=None, screen=r1, at=None, seconds=t1, chosen=helps + hurts,
                       top=[r if r["passes"] or not (r1n["passes"] or "note" in r1n) else r1n
                            for r, r1n in zip(top1, top1n)],  # the same 12 heads, judged for either sign
                       title="1. -> logits\n(-) raise the logit difference, (+) lower it"))
    say("; ".join(f"{c}: {classes[c]}" for c in STAGE1))

    steered = classes["name movers"] + classes["S-suppression"]  # heads that raise the logit difference by attending a name
    if steered:
        classes["S-inhibition"], _ = stage(2, "-> queries at END of the name movers and S-suppression heads: S-inhibition",
                                           "2. -> name movers' (and S-suppression) <q>\nS-inhibition (selected at END)",
                                           [f"{h}<q>" for h in steered], ["END"], -1, "S-inhibition")
        taken |= set(classes["S-inhibition"])
        say(f"S-inhibition: {classes['S-inhibition']}")

    if classes["S-inhibition"]:
        found, _ = stage(3, "-> S-inhibition keys and values at S2: induction and duplicate-token heads",
                         "3. -> S-inhibition <k>,<v>\ninduction, duplicate token (selected at S2)",
                         [f"{h}<{p}>" for h in classes["S-inhibition"] for p in ("k", "v")], ["S2"], -1,
                         "induction / duplicate token")
        taken |= set(found)
        for h in found:  # induction: S2 attends S1+1; duplicate token: S2 attends S1
            l, hh = lh(h)
            cls = "induction" if att["S2->S1+1"][l, hh] >= att["S2->S1"][l, hh] else "duplicate token"
            classes[cls].append(h)
        say(f"induction: {classes['induction']}; duplicate token: {classes['duplicate token']}")

    if classes["induction"]:
        classes["previous token"], _ = stage(4, "-> induction heads' keys at S1+1: previous-token heads",
                                             "4. -> induction <k>\nprevious token (selected at S1+1)",
                                             [f"{h}<k>" for h in classes["induction"]], ["S1+1"], -1, "previous token")
        say(f"previous token: {classes['previous token']}")

    # --- checks of each head against its class ---
    heads = {}
    for c, members in classes.items():
        for h in members:
            l, hh = lh(h)
            a_ = {k: float(v[l, hh]) for k, v in att.items()}
            st = next(s for s in stages if h in s["chosen"])
            res = st["at"] if st["at"] is not None else st["screen"]
            d_ = float(dla.heads[l, hh])
            to_io, to_s = a_["END->IO"], a_["END->S1"] + a_["END->S2"]
            if c in STAGE1:  # the class already says what END attends; the direct effect must agree in sign
                eff = r1.senders[h]
                ok = (d_ > 0) == (eff < 0)
                why = f"DLA {d_:+.2f} for a path-patching effect {eff:+.3f}; END->IO {to_io:.2f}, END->S1+S2 {to_s:.2f}"
            elif c == "S-inhibition":
                ok, why = a_["END->S2"] > a_["END->IO"], f"END->S2 {a_['END->S2']:.2f} vs END->IO {a_['END->IO']:.2f}"
            elif c == "induction":
                ok, why = a_["S2->S1+1"] >= 0.1, f"S2->S1+1 {a_['S2->S1+1']:.2f} (needs >= 0.10)"
            elif c == "duplicate token":
                ok, why = a_["S2->S1"] >= 0.1, f"S2->S1 {a_['S2->S1']:.2f} (needs >= 0.10)"
            else:
                ok, why = a_["S1+1->S1"] >= 0.1, f"S1+1->S1 {a_['S1+1->S1']:.2f} (needs >= 0.10)"
            heads[h] = {"class": c, "effect": res.senders[h], "effect_se": res.senders_se[h], "stage": st["stage"],
                        "positions": st["positions"], "screen_effect": st["screen"].senders[h], "dla": d_, "attention": {k: round(v, 3) for k, v in a_.items()},
                        "head_scores": {k: float(v[l, hh]) for k, v in hs.items()},
                        "check": bool(ok), "check_reason": why}
    say("checks: " + ", ".join(f"{h} {'ok' if v['check'] else 'FAILS'}" for h, v in heads.items()))

    # --- the spec, evaluated on held-out rows ---
    say(f"evaluating on {len(held)} held-out prompts")
    ev_h = Evaluator(model, held, progress=False)
    L = G.n_layers
    baseline = CircuitSpec(name="every MLP, no head").group("MLPs", [f"m{l}" for l in range(L)])
    candidates = {  # key -> spec; the last is a baseline, never shipped
        "heads: classes, positions and ports (the GPT-2 IOI spec's structure)": build_spec(classes),
        "heads + MLPs: classes, positions and ports, every MLP read like the embedding": build_spec(classes, mlps=L),
        "node circuit: the classes' heads (induced edges, all positions)":
            build_spec(classes, name="IOI circuit (SmolLM2-135M), node circuit", positional=False),
        f"node circuit: the classes' heads + all {L} MLPs":
            build_spec(classes, name="IOI circuit (SmolLM2-135M), node circuit with MLPs", positional=False, mlps=L),
        f"baseline: all {L} MLPs, no head": baseline,
    }
    variants = {}
    for key, sp in candidates.items():
        sc = ev_h.evaluate(sp)
        variants[key] = score_dict(sc)
        say(f"  {key}: {sc.n_edges} edges, faithfulness {pm(sc.faithfulness, sc.faithfulness_se)}, "
            f"necessity {pm(sc.necessity, sc.necessity_se)}")
    # shipping rule: the first of these (most specific first) whose faithfulness is within 2 s.e. of the best circuit's
    order = list(candidates)[:4]
    faith = {k: (variants[k]["faithfulness"] or 0.0, variants[k]["faithfulness_se"] or 0.0) for k in order}
    best = max(order, key=lambda k: faith[k][0])
    shipped = next(k for k in order if faith[k][0] >= faith[best][0] - 2 * math.hypot(faith[k][1], faith[best][1]))
    shipped_spec = candidates[shipped]
    why = (f"Rule: ship the most specific circuit (positions and ports before node circuits, heads only before "
           f"heads + MLPs) whose faithfulness is within 2 combined s.e. of the best one ({best}: {faith[best][0]:.2f}). "
           + "; ".join(f"{k}: {faith[k][0]:.2f} ± {faith[k][1]:.2f}" for k in order) + ".")
    say(f"shipping: {shipped}")
    removals = class_removals(ev_h, shipped_spec)
    for c, v in removals.items():
        say(f"  without {c}: faithfulness {v['faithfulness_without']:.3f}, drop {v['drop']:+.3f} ± {v['drop_se']:.3f}")
    node_eff = {}
    if args.node_effects:
        say("node effects (each head removed from the shipped spec)")
        for h, (drop, se) in ev_h.node_effects(shipped_spec).items():
            node_eff[h] = {"class": shipped_spec.group_of(h), "drop": drop, "se": se}
        say("  " + ", ".join(f"{h} {v['drop']:+.3f}" for h, v in node_eff.items()))

    sv = variants[shipped]
    shipped_spec.metadata.update({
        "faithfulness": round(sv["faithfulness"], 4) if sv["faithfulness"] is not None else None,
        "faithfulness_se": sv["faithfulness_se"] and round(sv["faithfulness_se"], 4),
        "necessity": round(sv["necessity"], 4) if sv["necessity"] is not None else None,
        "necessity_se": sv["necessity_se"] and round(sv["necessity_se"], 4),
        "evaluated_on": f"{len(held)} held-out IOI prompts (circuitgraph make-data ioi --seed {args.eval_seed}), "
                        f"ABC corruption, logit difference, corrupted ablation",
        "path_patching_effects": {h: round(v["effect"], 4) for h, v in heads.items()},
        "selection_rule": f"per stage: |effect| >= {THRESHOLD:g} of the clean-corrupted gap, >= {MIN_Z:g} s.e., "
                          f"sign of the stage, top {TOP_K}",
        "found_on": f"{len(data)} IOI prompts (seed {args.seed})",
        "method": PAPER,
        "shipped_as": shipped,
        "faithfulness_of_the_alternatives": {k: [v["faithfulness"], v["faithfulness_se"]] for k, v in variants.items()
                                             if k != shipped},
        "faithfulness_drop_without_group": {c: [round(v["drop"], 4), round(v["drop_se"], 4)] for c, v in removals.items()},
    })
    args.spec_out.parent.mkdir(parents=True, exist_ok=True)
    shipped_spec.to_json(args.spec_out)
    say(f"wrote {args.spec_out}")

    # --- what is uncertain ---
    uncertain = []
    for c in WANG_CLASSES:
        if not classes[c]:
            uncertain.append(f"No head passed the rule for '{c}' (a class of Wang et al.'s GPT-2 circuit): it is not "
                             f"found in this model by this procedure, or its heads sit below the threshold; the "
                             f"stage's largest effects are in the tables.")
    for h, v in heads.items():
        if not v["check"]:
            uncertain.append(f"{h} ({v['class']}) fails its attention/DLA check: {v['check_reason']}.")
    for c, v in removals.items():
        if abs(v["drop"]) < 2 * v["drop_se"]:
            uncertain.append(f"Removing '{c}' changes the faithfulness by {v['drop']:+.3f} ± {v['drop_se']:.3f}: "
                             f"not distinguishable from zero on {len(held)} prompts.")
    for c, v in removals.items():
        members = classes.get(c, [])
        if members and all(heads[h]["effect"] > 0 for h in members) and v["drop"] > 2 * v["drop_se"]:
            uncertain.append(f"'{c}' lower the logit difference through their direct path (stage 1), yet removing them "
                             f"from the shipped spec lowers its faithfulness ({v['drop']:+.3f} ± {v['drop_se']:.3f}): in "
                             f"the circuit they also feed the MLPs at END, which the direct path does not show; "
                             f"not resolved further.")
    top_mlps1 = sorted(((n, e) for n, e in r1.senders.items() if n.startswith("m")), key=lambda x: -abs(x[1]))[:3]
    k_heads, _, k_node, k_node_mlps, k_base = list(candidates)
    f_ = lambda k: pm(variants[k]["faithfulness"], variants[k]["faithfulness_se"])
    if (variants[k_heads]["faithfulness"] or 0.0) < 0.1:
        uncertain.append(f"Under corrupted ablation the heads alone carry almost nothing ({f_(k_heads)} with positions "
                         f"and ports, {f_(k_node)} as a node circuit), against {f_(k_node_mlps)} once every MLP is kept. "
                         f"Presumably, with every MLP's output taken from the corrupted run, the residual stream at the "
                         f"name positions describes the corrupted names, and the name movers copy those. Every MLP "
                         f"without any head gives {f_(k_base)}, so what the heads + MLPs circuits add over it is the "
                         f"heads'. Which MLPs are needed (the largest MLP paths to the logits: "
                         + ", ".join(f"{n} {e:+.3f}" for n, e in top_mlps1) + ") was not resolved.")
    uncertain.append(f"Discovery used {len(data)} prompts; effects near the threshold ({THRESHOLD:g}) could change "
                     f"class membership with another sample (their s.e. are in the stage tables).")
    uncertain.append("Backup name movers (heads that take over when the name movers are ablated) were not "
                     "searched for: that needs a second round of path patching with the name movers knocked out.")

    out = {
        "model": args.model, "quantization": model.quantization, "threads": args.threads,
        "selection_rule": {"threshold": THRESHOLD, "min_z": MIN_Z, "top_k": TOP_K},
        "discovery": {"n": len(data), "seed": args.seed, "clean_logit_diff": float(ev.clean_values.mean()),
                      "corrupted_logit_diff": float(ev.base_values.mean())},
        "classes": classes, "heads": heads,
        "graph": {"n_layers": G.n_layers, "n_heads": G.n_heads},
        "stages": [{"stage": s["stage"], "label": s["label"], "title": s["title"], "receivers": s["receivers"], "positions": s["positions"],
                    "seconds": s["seconds"], "selected": s["chosen"], "top": s["top"],
                    "mlps": [(n, e) for n, e in sorted(((n, e) for n, e in s["screen"].senders.items()
                                                         if n.startswith("m") and math.isfinite(e)),
                                                        key=lambda x: -abs(x[1]))[:3]],
                    "screen_all_positions": {n: [e, s["screen"].senders_se[n]] for n, e in s["screen"].senders.items()
                                             if math.isfinite(e)},
                    "at_positions": None if s["at"] is None else
                    {n: [e, s["at"].senders_se[n]] for n, e in s["at"].senders.items() if math.isfinite(e)}}
                   for s in stages],
        "dla": {"logit_diff": dla.logit_diff, "heads": {head_name(l, h): float(dla.heads[l, h])
                                                         for l in range(G.n_layers) for h in range(G.n_heads)},
                "mlps": {f"m{l}": float(dla.mlps[l]) for l in range(G.n_layers)}},
        "head_score_top": {k: top_of(v) for k, v in hs.items()},
        "evaluation": {"n": len(held), "seed": args.eval_seed, "shared_prompts_with_discovery": len(overlap),
                       "clean_logit_diff": float(ev_h.clean_values.mean()),
                       "corrupted_logit_diff": float(ev_h.base_values.mean()),
                       "variants": variants, "shipped": shipped, "shipped_why": why,
                       "class_removals": removals, "node_effects": node_eff},
        "uncertain": uncertain,
        "runtime_s": time.time() - T0, "cpu_s": time.process_time() - cpu0,
        "load_average_at_start_and_end": [load0, list(os.getloadavg())],  # other jobs on the same cores slow the wall time
    }
    (args.out / "smollm2_ioi_circuit.json").write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    write_markdown(out, args.out / "smollm2_ioi_circuit.md")
    draw(out, args.spec_out, args.out)
    say(f"wrote {args.out / 'smollm2_ioi_circuit.json'}, .md and the figures; total {time.time() - T0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
