"""Attention heads: their patterns on an example, and head-type scores over many prompts.

Head-type scores use TransformerLens's detection patterns (``transformer_lens.head_detector``)
on patterns read from the engine's forward.  A score is the attention mass a head puts on the
pattern's target keys, averaged over the query positions that *have* a target (so rows with
nothing to find do not dilute it); 1 = always exactly on target, 0 = never.

- previous-token: key ``i-1`` for query ``i``;
- duplicate-token: earlier positions holding the same token;
- induction: the positions right after earlier copies of the current token;

the last two (and, by default, the first) on repeated random tokens ``[BOS] a_1..a_k a_1..a_k``.
:func:`head_scores` adds the OV copying score (:mod:`.qkov`) and direct logit attribution
(:mod:`.dla`) so one call characterises every head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformer_lens.head_detector import (get_duplicate_token_head_detection_pattern,
                                            get_induction_head_detection_pattern,
                                            get_previous_token_head_detection_pattern)

from circuitgraph.graph import NodeRef
from circuitgraph.model.loading import CircuitModel
from circuitgraph.plots import heatmap, new_figure, save, token_labels

DETECTORS = {"previous_token": get_previous_token_head_detection_pattern,
             "duplicate_token": get_duplicate_token_head_detection_pattern,
             "induction": get_induction_head_detection_pattern}


def _head(name: str) -> tuple[int, int]:
    ref = NodeRef.parse(name, where="head")
    if not ref.is_head:
        raise ValueError(f"'{name}' is not an attention head (expected 'a<layer>.h<head>')")
    return ref.layer, ref.head


def _tokens(model: CircuitModel, text_or_ids) -> torch.Tensor:
    if isinstance(text_or_ids, str):
        return torch.tensor(model.tokenizer(text_or_ids)["input_ids"])
    return torch.as_tensor(text_or_ids).flatten()


@torch.no_grad()
def all_patterns(model: CircuitModel, tokens: torch.Tensor) -> torch.Tensor:
    """Attention patterns ``[L, B, H, P, P]`` of every head on ``tokens [B, P]`` (the engine's forward)."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.graph.n_layers)]
    _, cache = model.run_with_cache(tokens.to(model.device), names_filter=lambda n: n in names)
    return torch.stack([cache[n].float().cpu() for n in names])


# ----- patterns of chosen heads -----------------------------------------------------------
@dataclass
class AttentionPatterns:
    """Attention patterns of chosen heads on one prompt, with the position labels that make a figure readable."""

    patterns: torch.Tensor  # [n_heads_chosen, query position, key position]
    heads: list[str]
    tokens: list[str]  # position labels
    dims: tuple[str, ...] = ("head", "query", "key")


def attention_patterns(model: CircuitModel, text_or_ids, heads: list[str] | None = None) -> AttentionPatterns:
    """Patterns of ``heads`` (default: all) on one prompt (text, tokenized as the model does, or ids)."""
    ids = _tokens(model, text_or_ids)
    pats = all_patterns(model, ids[None])[:, 0]  # [L, H, P, P]
    G = model.graph
    heads = heads or [f"a{l}.h{h}" for l in range(G.n_layers) for h in range(G.n_heads)]
    for h in heads:
        G.check_node(h, where="head")
    sel = torch.stack([pats[l, h] for l, h in map(_head, heads)])
    return AttentionPatterns(sel, list(heads), token_labels(model.tokenizer, ids.tolist()))


def plot_attention(patterns: AttentionPatterns, path, max_cols: int = 4, title: str | None = None):
    """One query x key heatmap per head, token labels on both axes."""
    n = len(patterns.heads)
    cols = min(n, max_cols)
    rows = -(-n // cols)
    P = patterns.patterns.shape[-1]
    from matplotlib.figure import Figure

    side = min(max(3.2, 0.28 * P + 1.8), 9.0)
    fig = Figure(figsize=(side * cols, side * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, name, pat in zip(axes, patterns.heads, patterns.patterns):
        heatmap(fig, ax, pat, patterns.tokens, patterns.tokens, diverging=False, cmap="Blues", vmin=0.0, vmax=1.0,
                title=name, xlabel="key", ylabel="query", annotate=False)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save(fig, path)


# ----- head-type scores ---------------------------------------------------------------------
def repeated_tokens(model: CircuitModel, n: int = 16, seq_len: int = 20, seed: int = 0, bos: bool = True) -> torch.Tensor:
    """``[n, bos + 2*seq_len]`` prompts: ``seq_len`` distinct random ordinary tokens, then the same again."""
    special = set(getattr(model.tokenizer, "all_special_ids", None) or [])
    vocab = torch.tensor([t for t in range(model.weights.W_U.shape[0]) if t not in special])
    seq_len = min(seq_len, len(vocab))
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([vocab[torch.randperm(len(vocab), generator=g)[:seq_len]] for _ in range(n)])
    out = torch.cat([first, first], dim=1)
    bos_id = getattr(model.tokenizer, "bos_token_id", None)
    if bos and bos_id is not None:
        out = torch.cat([torch.full((n, 1), bos_id), out], dim=1)
    return out


def detection_scores(model: CircuitModel, tokens: torch.Tensor, kind: str, lengths: torch.Tensor | None = None,
                     batch_size: int = 32) -> torch.Tensor:
    """``[L, H]`` score of one head type (see module docstring) on ``tokens [B, P]``."""
    return detection_scores_of(model, tokens, [kind], lengths, batch_size)[kind]


def detection_scores_of(model: CircuitModel, tokens: torch.Tensor, kinds: list[str], lengths: torch.Tensor | None = None,
                        batch_size: int = 32) -> dict[str, torch.Tensor]:
    """:func:`detection_scores` of several head types from one forward per batch: ``{kind: [L, H]}``."""
    for kind in kinds:
        if kind not in DETECTORS:
            raise ValueError(f"unknown head type '{kind}'; expected one of {', '.join(DETECTORS)}")
    G = model.graph
    hit = {k: torch.zeros(G.n_layers, G.n_heads, dtype=torch.float64) for k in kinds}
    rows = dict.fromkeys(kinds, 0)
    for a in range(0, len(tokens), batch_size):
        toks = tokens[a:a + batch_size]
        pats = all_patterns(model, toks)  # [L, B, H, P, P]
        for b in range(len(toks)):
            P = int(lengths[a + b]) if lengths is not None else toks.shape[1]
            for kind in kinds:
                det = DETECTORS[kind](toks[b:b + 1, :P].cpu()).float()  # [P, P]
                has = det.sum(-1) > 0
                if not has.any():
                    continue
                mass = (pats[:, b, :, :P, :P] * det).sum(-1)  # [L, H, P]
                hit[kind] += mass[..., has].sum(-1).double()
                rows[kind] += int(has.sum())
    return {k: (hit[k] / max(rows[k], 1)).float() for k in kinds}


@dataclass
class HeadScores:
    """Per-head scores ``[n_layers, n_heads]`` by name (see module docstring and :func:`head_scores`)."""

    scores: dict[str, torch.Tensor]
    notes: dict[str, str] = field(default_factory=dict)
    dims: tuple[str, str] = ("layer", "head")

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.scores[k]

    def top(self, kind: str, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` heads with the highest score of ``kind``, as ``(name, score)``, best first."""
        s = self.scores[kind]
        idx = torch.argsort(s.flatten(), descending=True)[:k]
        H = s.shape[1]
        return [(f"a{int(i) // H}.h{int(i) % H}", float(s.flatten()[i])) for i in idx]


def head_scores(model: CircuitModel, data=None, n_random: int = 16, seq_len: int = 20, seed: int = 0) -> HeadScores:
    """Previous-token, duplicate-token, induction and copying scores of every head; DLA too when ``data`` is given."""
    if data is not None:
        model.check_padding(data)
    from circuitgraph.characterise.qkov import copying_scores

    rep = repeated_tokens(model, n_random, seq_len, seed)
    scores = detection_scores_of(model, rep, list(DETECTORS))  # one forward for every head type
    scores["copying"] = copying_scores(model)
    notes = {k: "attention mass on the pattern's targets, over query positions with a target, on repeated random tokens"
             for k in DETECTORS}
    notes["copying"] = "sum(Re eig) / sum(|eig|) of the OV circuit W_E W_V W_O W_U (1 = copies its input token)"
    if data is not None:
        from circuitgraph.characterise.dla import direct_logit_attribution

        scores["dla"] = direct_logit_attribution(model, data).heads
        notes["dla"] = "mean direct contribution to logit(answer) - logit(wrong) at the last position"
    return HeadScores(scores, notes)


def plot_head_scores(scores: HeadScores, path, kinds: list[str] | None = None):
    """One layer x head panel per score."""
    kinds = kinds or list(scores.scores)
    L, H = next(iter(scores.scores.values())).shape
    fig, axes = new_figure(L, H, panels=len(kinds), min_w=3.6)
    for ax, k in zip(axes, kinds):
        s = scores.scores[k]
        heatmap(fig, ax, s, [f"L{l}" for l in range(L)], [f"h{h}" for h in range(H)],
                diverging=k in ("dla", "copying"), vmax=1.0 if k in DETECTORS or k == "copying" else None,
                vmin=0.0 if k in DETECTORS else None,
                title=k.replace("_", " "), xlabel="head", ylabel="layer", origin_lower=True)
    return save(fig, path)


__all__ = ["AttentionPatterns", "HeadScores", "all_patterns", "attention_patterns", "detection_scores", "detection_scores_of", "head_scores",
           "plot_attention", "plot_head_scores", "repeated_tokens"]
