"""Everything an explorer page shows, gathered by the existing scoring and characterisation functions.

Nothing is computed a second way here: circuit scores and node/edge effects come from
:class:`~circuitgraph.evaluate.Evaluator`, attention patterns, head-type scores, direct logit
attribution, top neurons, integrated gradients and the logit lens from :mod:`circuitgraph.characterise`.
This module only picks what the page needs, rounds it, and records the limits it applied so the
page can say them (a GPT-2-small graph has 32,491 edges; a page embeds the circuits' edges plus the
``top_edges`` best-scored others).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch

from circuitgraph.data.dataset import TaskData
from circuitgraph.explore.layout import layout, node_kind
from circuitgraph.graph import NodeRef
from circuitgraph.model.loading import CircuitModel
from circuitgraph.spec.circuit_spec import CircuitSpec

from circuitgraph.explore.style import group_colors, page_style


@dataclass
class Limits:
    """What a page embeds; the defaults keep a GPT-2-small study to a few MB."""

    examples: int = 8  # dataset rows the example picker offers (the first ones)
    top_edges: int = 1000  # scored edges outside every circuit, best |score| first
    effect_edges: int = 1000  # per-edge removal effects are measured for circuits up to this size
    # node and edge effects on the first rows only: one removal run per node and edge is the page's largest
    # cost (378 removals of a 300-edge SmolLM2-135M circuit over 16 rows: 34 of the page's 74 s on 2 cores)
    effect_rows: int = 16
    pattern_heads: int = 48  # every head's attention pattern up to this many heads, else the circuits' heads only
    neurons: int = 10  # top neurons per MLP
    ig_steps: int = 32  # integrated-gradient steps


def _r(x, digits: int = 4):
    """A JSON number with ``digits`` significant digits; None for None (undefined), NaN and inf."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    x = float(f"{x:.{digits}g}")
    return int(x) if x.is_integer() and abs(x) < 2**53 else x  # "0", not "0.0": patterns are mostly zeros


def _rows(t: torch.Tensor, digits: int = 3) -> list:
    return [[_r(v, digits) for v in row] for row in t.tolist()]


def _edge_scores(spec: CircuitSpec) -> dict[str, float]:
    scores = {k: v for k, v in spec.edge_scores.items() if v is not None}
    scores.update({e.edge: e.score for e in spec.edges if e.score is not None})
    return scores


def collect(model: CircuitModel, data: TaskData, circuits: list[CircuitSpec], evaluator=None,
            limits: Limits | None = None, title: str | None = None, model_name: str | None = None,
            progress: bool = False, edge_effects: list | None = None) -> dict:
    """The page's data: graph layout, circuits with scores and effects, per-example characterisation.

    ``edge_effects`` (one entry per circuit, None where not known) passes on what
    :meth:`Evaluator.edge_effects` already returned for a circuit, so it is not measured twice."""
    from circuitgraph.characterise.neurons import top_from
    from circuitgraph.evaluate.evaluator import Evaluator

    if not circuits:
        raise ValueError("an explorer page needs at least one circuit spec")
    if len(circuits) > 2:
        raise ValueError(f"an explorer page compares at most two circuits, got {len(circuits)}")
    limits = limits or Limits()
    G = model.graph
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = evaluator or Evaluator(model, data, progress=progress)
        resolved = [ev.resolve(c) for c in circuits]
        out = {
            "version": 1,
            "title": title or " vs ".join(c.name or f"circuit {i + 1}" for i, c in enumerate(circuits)),
            "model": model_name or getattr(model, "name", None) or next((c.model for c in circuits if c.model), None),
            "quantization": getattr(model, "quantization", None),  # a GGUF's, shown in the footer
            "metric": ev.metric_name, "ablation": ev.ablation_kind, "n_examples": len(data),
            "graph": {"n_layers": G.n_layers, "n_heads": G.n_heads, "parallel": G.parallel_attn_mlp,
                      "n_nodes": len(G.nodes), "n_edges": G.n_edges},
            "nodes": layout(G),
            "groups": _groups(circuits), "style": page_style(),
        }
        known = list(edge_effects or []) + [None] * len(circuits)
        on = effect_evaluator(ev, limits)
        out["circuits"], effects = _circuits(on, ev, circuits, resolved, limits, known)
        out["edges"], n_scored = _edges(G, circuits, resolved, effects, limits)
        sub = data.slice(0, min(limits.examples, len(data)))
        heads = _pattern_heads(G, out["edges"], limits)
        out["heads"] = _head_scores(model)
        out["dla"], per_example_dla = _dla(model, data)
        mlps = sorted({n for e in out["edges"] if e["in"] for n in (e["src"], e["dst"]) if node_kind(n) == "mlp"},
                      key=lambda n: int(n[1:]))
        if G.n_layers * G.n_heads <= limits.pattern_heads:  # a small model: every MLP, like every head
            mlps = [f"m{l}" for l in range(G.n_layers)]
        acts = _neuron_activations(model, data, mlps)
        out["neurons"] = {m: _top(top_from(acts[m], m, limits.neurons)) for m in mlps}
        out["examples"] = _examples(model, ev, sub, resolved, heads, acts, per_example_dla, limits)
    out["limits"] = {**asdict(limits), "edges_embedded": len(out["edges"]), "edges_scored": n_scored,
                     "effect_rows_used": len(on.data),
                     "pattern_heads_embedded": heads, "neuron_mlps_embedded": mlps}
    return out


def _groups(circuits: list[CircuitSpec]) -> dict:
    groups: dict[str, dict] = {}
    for spec in circuits:
        colors = group_colors(spec)
        for name, g in spec.groups.items():
            if name not in groups:
                groups[name] = {"color": colors[name], "nodes": list(g.nodes), "description": g.description}
    return groups


def _score(score) -> dict:
    keys = ("faithfulness", "faithfulness_se", "necessity", "necessity_se", "clean_metric", "clean_metric_se",
            "corrupted_metric", "corrupted_metric_se", "circuit_metric", "circuit_metric_se", "n_edges", "n_edges_total")
    d = {k: _r(getattr(score, k)) for k in keys}
    reasons = [getattr(score, k, None) for k in ("undefined_reason", "se_reason")]  # why a number is missing
    msgs = list(dict.fromkeys(list(score.warnings) + [r for r in reasons if r]))
    d["warnings"] = [m for m in msgs if not any(m != o and m in o for o in msgs)]  # a warning its reason repeats: once
    return d


def effect_evaluator(ev, limits: Limits):
    """The evaluator of the rows effects are measured on: the first ``limits.effect_rows`` (all of them where
    those rows cannot tell the clean run from the ablated one)."""
    sub = ev.first_rows(limits.effect_rows)
    return ev if sub.undefined_reason and not ev.undefined_reason else sub


def _circuits(on, ev, circuits, resolved, limits, known):
    """Each circuit's score (``ev``: every row) and its node and edge effects (``on``: :func:`effect_evaluator`)."""
    out, effects = [], []
    for i, (spec, res) in enumerate(zip(circuits, resolved)):
        measured = known[i] is not None or len(res) <= limits.effect_edges
        # node and edge effects from one set of runs (the circuit's run paused once per layer serves both)
        reuse = known[i] is not None and on is ev  # handed-over effects are of every row
        nodes, edges = on.effects(res, edges=measured and not reuse)
        edges = known[i] if reuse else edges
        effects.append(edges)
        boot = spec.metadata.get("bootstrap") if spec.edge_frequency else None
        out.append({"name": spec.name or f"circuit {i + 1}", "description": spec.description, "source": spec.source,
                    "n_resamples": boot.get("n_resamples") if isinstance(boot, dict) else None,
                    "n_edges": len(res), "score": _score(ev.evaluate(res)),
                    "node_effects": {n: [_r(d), _r(se)] for n, (d, se) in nodes.items()},
                    "edge_effects_measured": measured})
    return out, effects


def _edges(G, circuits, resolved, effects, limits):
    """Every circuit edge, then the ``top_edges`` best-scored others; with scores, effects, positions and, per circuit
    that has them, bootstrap inclusion frequencies (0 for an edge no resample held)."""
    scores: dict[str, float] = {}
    for spec in circuits:
        for k, v in _edge_scores(spec).items():
            scores.setdefault(k, v)
    freq = [spec.edge_frequency for spec in circuits]  # bootstrap inclusion frequencies, where discover wrote them
    pos_freq: dict[str, dict] = {}
    for spec in circuits:
        for k, v in spec.position_frequency.items():
            pos_freq.setdefault(k, v)
    members: dict[str, int] = {}
    positions: dict[str, list[str] | None] = {}
    for i, res in enumerate(resolved):
        for (s, d), pos in res.edges.items():
            name = f"{G.sources[s]}->{G.destinations[d]}"
            members[name] = members.get(name, 0) | (1 << i)
            positions.setdefault(name, None if pos is None else sorted(pos))
    others = sorted((k for k in scores if k not in members and k in G.edge_index), key=lambda k: -abs(scores[k]))
    names = list(members) + others[:limits.top_edges]
    out = []
    for name in names:
        src, dst = name.split("->")
        eff = [[_r(e[name][0]), _r(e[name][1])] if name in e else None for e in effects]
        out.append({"id": name, "src": src, "dst": G.node_of(dst), "port": dst[dst.index("<") + 1:-1] if "<" in dst else None,
                    "in": members.get(name, 0), "score": _r(scores[name]) if name in scores else None, "eff": eff,
                    "pos": positions.get(name), "freq": [_r(f.get(name, 0.0)) if f else None for f in freq],
                    "pos_freq": {k: _r(v) for k, v in pos_freq[name].items()} if name in pos_freq else None})
    return out, len([k for k in scores if k in G.edge_index])


def _pattern_heads(G, edges, limits) -> list[str]:
    every = [f"a{l}.h{h}" for l in range(G.n_layers) for h in range(G.n_heads)]
    if len(every) <= limits.pattern_heads:
        return every
    used = {n for e in edges if e["in"] for n in (e["src"], e["dst"])}
    return [h for h in every if h in used]


def _head_scores(model) -> dict:
    from circuitgraph.characterise.heads import head_scores

    ctx = getattr(getattr(model.hf, "config", None), "max_position_embeddings", None) or 41
    hs = head_scores(model, seq_len=max(2, min(20, (ctx - 1) // 2)))  # [BOS] + twice seq_len tokens fit the context
    return {"scores": {k: _rows(v) for k, v in hs.scores.items()}, "notes": hs.notes}


def _dla(model, data):
    """Mean direct logit attribution of every node with its standard error, and the per-example rows."""
    from circuitgraph.characterise.dla import direct_logit_attribution

    res = direct_logit_attribution(model, data)
    per = res.per_example.double()
    se = per.std(0) / math.sqrt(len(per)) if len(per) > 1 else torch.full((per.shape[1],), float("nan"))
    nodes = {n: [_r(m), _r(s)] for n, m, s in zip(res.sources, per.mean(0).tolist(), se.tolist())}
    return {"nodes": nodes, "input": _r(res.input), "bias": _r(res.bias), "logit_diff": _r(res.logit_diff)}, res


def _neuron_activations(model, data, mlps) -> dict:
    """Each MLP's hidden activations at the last position of every example ``{m: [N, d_mlp]}``, from one
    forward: the dataset's top neurons and each example's (its own row) both come from them."""
    from circuitgraph.characterise.neurons import neuron_activations_of

    return neuron_activations_of(model, data, mlps) if mlps else {}


def _top(act) -> list:
    """``[[neuron, mean activation, max activation], ...]``, most active first."""
    return [[int(n), _r(m), _r(x)] for n, m, x in zip(act.neurons.tolist(), act.mean.tolist(), act.max.tolist())]


def _examples(model, ev, sub: TaskData, resolved, heads, acts, dla, limits) -> list[dict]:
    """The first rows' views; ``acts``: :func:`_neuron_activations` of the whole dataset (its first rows are ``sub``)."""
    from circuitgraph.characterise.heads import all_patterns
    from circuitgraph.characterise.integrated_gradients import integrated_gradients
    from circuitgraph.characterise.logit_lens import logit_lens
    from circuitgraph.characterise.neurons import top_from
    from circuitgraph.characterise.plots import token_labels

    tok = model.tokenizer
    n = len(sub)
    ig = integrated_gradients(model, sub, metric=ev.metric_name, n_steps=limits.ig_steps)
    lens = logit_lens(model, sub, keep_logits=True)
    probs = lens.logits.float().softmax(-1)  # [S, n, vocab]
    circuit_values = [ev.circuit_values(r)[:n] for r in resolved]  # the runs that scored the circuits
    # every example's patterns from one forward of the rows (padding changes none: attention is causal or, as the
    # Evaluator checked, every row has one length)
    pats = all_patterns(model, sub.clean) if heads else None  # [L, n, H, P, P]
    at = [(ref.layer, ref.head) for ref in map(NodeRef.parse, heads)]
    out = []
    for i in range(n):
        P = int(sub.lengths[i])
        ids = sub.clean[i, :P]
        differs = (sub.clean[i, :P] != sub.corrupted[i, :P]).tolist()
        ex = sub.examples[i] if i < len(sub.examples) else None
        wrong = sub.wrongs[i][sub.wrongs[i] >= 0]
        answer = sub.answers[i][sub.answers[i] >= 0]
        out.append({
            "index": i,
            "clean": ex.clean if ex else None, "corrupted": ex.corrupted if ex else None,
            "answer": tok.decode(answer.tolist()) if tok else answer.tolist(),
            "wrong": tok.decode(wrong.tolist()) if tok else wrong.tolist(),
            "tokens": token_labels(tok, ids.tolist()), "differs": differs,
            "patterns": {h: [row[:q + 1] for q, row in enumerate(_rows(pats[l, i, hh, :P, :P], 3))]  # causal: keys <= query only
                         for h, (l, hh) in zip(heads, at)} if heads else {},
            "dla": {s: _r(v) for s, v in zip(dla.sources, dla.per_example[i].tolist())},
            "neurons": {m: _top(top_from(a[i:i + 1], m, limits.neurons)) for m, a in acts.items()},
            "ig": {"attributions": [_r(v) for v in ig.attributions[i, :P].tolist()],
                   "completeness_error": _r(ig.completeness_error[i]), "metric": ig.metric, "steps": ig.n_steps,
                   "delta": _r(ig.metric_clean[i] - ig.metric_corrupted[i])},
            "lens": {"labels": lens.labels,
                     "answer_prob": [_r(v) for v in lens.answer_prob[:, i].tolist()],
                     "wrong_prob": [_r(v) for v in probs[:, i, wrong].sum(-1).tolist()],
                     "logit_diff": [_r(v) for v in lens.logit_diff[:, i].tolist()],
                     "top": [tok.decode([int(t)]) if tok else str(int(t)) for t in lens.top_ids[:, i, 0]]},
            "metric": {"clean": _r(ev.clean_values[i]), "corrupted": _r(ev.base_values[i]),
                       "circuits": [_r(v[i]) for v in circuit_values]},
        })
    return out


__all__ = ["Limits", "collect"]
