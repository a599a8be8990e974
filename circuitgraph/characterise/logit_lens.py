"""Logit lens: decode intermediate residual streams (and single nodes) into next-token predictions.

- :func:`logit_lens`: the residual stream after the embedding and after every layer, each put
  through the model's own final norm and unembedding (so the last state gives the model's logits).
- :func:`node_lens`: each node's own output, decoded *linearly* with the clean run's final-norm
  scale (what the node alone pushes the logits towards; see :mod:`.dla`).
- :func:`lens_without`: the residual stream after a node's layer decoded with and without that
  node's update, i.e. what the node changes about the prediction at that depth.

All read each example's last position.  Reported per state and example: the answer's
probability (summed over answers), its reciprocal rank (best-ranked answer; 1 = top token), the
logit difference and the top-k token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitgraph.data.dataset import TaskData
from circuitgraph.evaluate.metrics import logit_diff
from circuitgraph.model.loading import CircuitModel
from circuitgraph.characterise.dla import final_norm_scale, linear_decode


@dataclass
class LensResult:
    """Residual states decoded through the final norm and unembedding:
    how well each predicts the answer, per state and example."""

    labels: list[str]  # one per decoded state
    answer_prob: torch.Tensor  # [S, N]
    reciprocal_rank: torch.Tensor  # [S, N]
    logit_diff: torch.Tensor  # [S, N]
    top_ids: torch.Tensor  # [S, N, k]
    logits: torch.Tensor | None = None  # [S, N, vocab] when asked for
    dims: tuple[str, str] = ("state", "example")

    def top_tokens(self, tokenizer, example: int = 0) -> dict[str, list[str]]:
        """The top-k tokens of one example at every state."""
        return {lab: [tokenizer.decode([int(t)]) for t in self.top_ids[s, example]] for s, lab in enumerate(self.labels)}


def summarise(logits: torch.Tensor, data: TaskData, labels: list[str], k: int = 5, keep_logits: bool = False) -> LensResult:
    """Lens statistics of ``logits [S, N, vocab]`` (answers and wrongs from ``data``)."""
    probs = logits.float().softmax(-1)
    ans = data.answers.to(logits.device)
    valid = ans >= 0
    p = probs.gather(-1, ans.clamp(min=0).expand(*probs.shape[:-1], ans.shape[-1]))
    answer_prob = (p * valid).sum(-1)
    ans_logit = logits.gather(-1, ans.clamp(min=0).expand(*logits.shape[:-1], ans.shape[-1]))
    ans_logit = ans_logit.masked_fill(~valid, float("-inf")).max(-1, keepdim=True).values
    rank = 1 + (logits > ans_logit).sum(-1)
    ld = logit_diff(logits, data.to(logits.device))
    return LensResult(labels, answer_prob.cpu(), (1.0 / rank.float()).cpu(), ld.float().cpu(),
                      logits.topk(k, dim=-1).indices.cpu(), logits.cpu() if keep_logits else None)


@torch.no_grad()
def residual_states(model: CircuitModel, data: TaskData) -> tuple[torch.Tensor, list[str]]:
    """Residual stream ``[n_layers + 1, N, D]`` at each example's last position: after the embedding, after each layer."""
    model.check_padding(data)
    L = model.graph.n_layers
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(L)]
    _, cache = model.run_with_cache(data.clean.to(model.device), names_filter=lambda n: n in names)
    idx, last = torch.arange(len(data)), data.last.to(model.device)
    return torch.stack([cache[n][idx, last] for n in names]), ["embed"] + [f"L{l}" for l in range(L)]


@torch.no_grad()
def logit_lens(model: CircuitModel, data: TaskData, k: int = 5, keep_logits: bool = False) -> LensResult:
    """Decode the residual stream after the embedding and after every layer (final norm applied to each)."""
    model.check_padding(data)
    states, labels = residual_states(model, data)
    return summarise(model.weights.unembed(states), data, labels, k, keep_logits)


@torch.no_grad()
def _node_outputs(model: CircuitModel, data: TaskData):
    """(every source's output ``[S, N, D]``, final residual ``[N, D]``) at the last positions."""
    model.check_padding(data)
    e, dev = model.engine, model.device
    _, outs = e.run(data.clean.to(dev), record=True)
    idx, last = torch.arange(len(data), device=dev), data.last.to(dev)
    final = e.make_ablation(outs, "clean").resid[-1][idx, last]
    return torch.cat([o[:, idx, last] for o in outs]), final, outs


@torch.no_grad()
def node_lens(model: CircuitModel, data: TaskData, nodes: list[str] | None = None, k: int = 5,
              keep_logits: bool = False) -> LensResult:
    """Decode each node's own output through the final norm frozen at the clean run's scale."""
    model.check_padding(data)
    G = model.graph
    nodes = nodes or list(G.sources)
    srcs, final, _ = _node_outputs(model, data)
    scale, centre = final_norm_scale(model, final)
    sel = torch.stack([srcs[G.source_index[G.check_node(n)]] for n in nodes])
    return summarise(linear_decode(model, sel, scale, centre), data, list(nodes), k, keep_logits)


@dataclass
class LensComparison:
    """A node's effect on the lens: the same states decoded with and without its output."""

    node: str
    layer: int  # decoded after this layer
    with_node: LensResult
    without_node: LensResult

    @property
    def answer_prob_change(self) -> torch.Tensor:
        """Per example: answer probability with the node minus without it."""
        return self.with_node.answer_prob[0] - self.without_node.answer_prob[0]


@torch.no_grad()
def lens_without(model: CircuitModel, data: TaskData, node: str, layer: int | None = None, k: int = 5) -> LensComparison:
    """Decode the residual after ``layer`` (default: the node's own layer) with and without ``node``'s output."""
    model.check_padding(data)
    G = model.graph
    ref = G.ref(node)
    if ref.kind in ("input", "logits"):
        raise ValueError(f"lens_without: '{node}' is not a head or MLP node")
    own = ref.layer
    layer = own if layer is None else layer
    if not own <= layer < G.n_layers:
        raise ValueError(f"lens_without: layer {layer} is before {node} writes (layer {own}) or past the last layer")
    states, _ = residual_states(model, data)
    srcs, _, _ = _node_outputs(model, data)
    resid = states[layer + 1]
    out = srcs[G.source_index[node]]
    both = model.weights.unembed(torch.stack([resid, resid - out]))
    w = summarise(both[:1], data, [f"L{layer} with {node}"], k)
    wo = summarise(both[1:], data, [f"L{layer} without {node}"], k)
    return LensComparison(node, layer, w, wo)


def plot_logit_lens(result: LensResult, path, title: str | None = None, tokenizer=None, example: int = 0):
    """Mean answer probability and reciprocal rank per state (± s.e.), top token of one example annotated."""
    from matplotlib.figure import Figure

    from circuitgraph.plots import save

    S, N = result.answer_prob.shape
    fig = Figure(figsize=(max(5.0, 0.55 * S + 2.5), 3.8), layout="constrained")
    ax = fig.subplots()
    x = torch.arange(S).numpy()
    for vals, name, c in ((result.answer_prob, "answer probability", "tab:blue"),
                          (result.reciprocal_rank, "answer reciprocal rank", "tab:orange")):
        m = vals.mean(1).numpy()
        se = (vals.std(1) / max(N, 1) ** 0.5).nan_to_num().numpy() if N > 1 else 0 * m
        ax.plot(x, m, marker="o", color=c, label=name)
        ax.fill_between(x, m - se, m + se, color=c, alpha=0.2)
    if tokenizer is not None:
        for s in range(S):
            ax.annotate(repr(tokenizer.decode([int(result.top_ids[s, example, 0])])), (x[s], 1.02), ha="center",
                        fontsize=7, rotation=30, xycoords=("data", "axes fraction"))
    ax.set_xticks(x, result.labels, rotation=45 if S > 8 else 0)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("mean over examples")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"logit lens ({N} examples)" + (f"; top token of example {example} above" if tokenizer else ""),
                 fontsize=10, pad=28 if tokenizer is not None else 6)
    return save(fig, path)


__all__ = ["LensComparison", "LensResult", "lens_without", "logit_lens", "node_lens", "plot_logit_lens", "residual_states",
           "summarise"]
