"""Neuron view of an MLP node: which neurons fire on a dataset, and what removing one does.

Activations are the MLP's hidden activations after the nonlinearity (the input of its output
projection, ``blocks.{L}.mlp.hook_post`` on the engine's forward).  Ablation sets chosen neurons to zero at every position of the
clean run; its effect is reported raw and normalised like path patching,
``(M(ablated) - M(clean)) / (M(clean) - M(corrupted))`` (-1 = as bad as the corrupted prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitgraph.characterise.activation_patching import last_logits
from circuitgraph.data.dataset import TaskData
from circuitgraph.evaluate.metrics import get_metric
from circuitgraph.model.loading import CircuitModel


def _layer(model: CircuitModel, node) -> int:
    if isinstance(node, int):
        node = f"m{node}"
    ref = model.graph.ref(node, where="MLP")
    if not ref.is_mlp:
        raise ValueError(f"'{node}' is not an MLP node (expected 'm<layer>')")
    return ref.layer


@dataclass
class NeuronActivity:
    """The most active neurons of one MLP over a dataset, at the last, every or a named position."""

    node: str
    position: str  # "last", "all" or a named position
    neurons: torch.Tensor  # [k] indices, most active first
    mean: torch.Tensor  # [k] mean activation over the dataset
    max: torch.Tensor  # [k]
    all_mean: torch.Tensor  # [d_mlp]


@torch.no_grad()
def neuron_activations(model: CircuitModel, data: TaskData, node, position: str = "last") -> torch.Tensor:
    """Hidden activations ``[rows, d_mlp]``: one row per example (``last`` / a named position) or per valid token (``all``)."""
    return neuron_activations_of(model, data, [node], position)[_name(node)]


@torch.no_grad()
def neuron_activations_of(model: CircuitModel, data: TaskData, nodes: list, position: str = "last") -> dict[str, torch.Tensor]:
    """:func:`neuron_activations` of several MLPs from one forward: ``{"m<L>": [rows, d_mlp]}``."""
    model.check_padding(data)
    names = {_name(n): f"blocks.{_layer(model, n)}.mlp.hook_post" for n in nodes}
    N, P = data.clean.shape
    if position == "all":
        rows = torch.arange(P)[None] < data.lengths[:, None]
        pick = lambda act: act[rows.to(act.device)]
    else:
        idx = data.last if position == "last" else data.positions[position]
        ok = idx >= 0
        at = (torch.arange(N)[ok], idx[ok])
        pick = lambda act: act[at[0].to(act.device), at[1].to(act.device)]  # only the rows asked for are kept
    kept: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        kept[hook.name] = pick(act).float().cpu()

    model.run_with_hooks(data.clean, [(name, keep) for name in dict.fromkeys(names.values())],
                         logit_positions=data.last.to(model.device))  # the logits are not used: unembed one position per row
    return {node: kept[name] for node, name in names.items()}


def _name(node) -> str:
    return node if isinstance(node, str) else f"m{node}"


def top_neurons(model: CircuitModel, data: TaskData, node, k: int = 10, position: str = "last") -> NeuronActivity:
    """The ``k`` neurons of an MLP with the highest mean activation."""
    return top_from(neuron_activations(model, data, node, position), _name(node), k, position)


def top_neurons_of(model: CircuitModel, data: TaskData, nodes: list, k: int = 10, position: str = "last") -> dict[str, NeuronActivity]:
    """:func:`top_neurons` of several MLPs from one forward."""
    acts = neuron_activations_of(model, data, nodes, position)
    return {node: top_from(act, node, k, position) for node, act in acts.items()}


def top_from(act: torch.Tensor, node: str, k: int = 10, position: str = "last") -> NeuronActivity:
    """The ``k`` most active neurons (highest mean) of activations ``[rows, d_mlp]`` (:func:`neuron_activations`)."""
    mean = act.mean(0)
    top = mean.topk(min(k, len(mean))).indices
    return NeuronActivity(node, position, top, mean[top], act.max(0).values[top], mean)


@dataclass
class NeuronEffects:
    """The metric with single neurons zeroed: which of an MLP's neurons the task relies on."""

    node: str
    neurons: torch.Tensor  # [k]
    clean_metric: float
    corrupted_metric: float
    ablated_metric: torch.Tensor  # [k] metric with that neuron zeroed
    effect: torch.Tensor  # [k] ablated - clean
    normalised: torch.Tensor  # [k] effect / (clean - corrupted)


@torch.no_grad()
def neuron_ablation(model: CircuitModel, data: TaskData, node, neurons, metric: str = "logit_diff",
                    max_batch: int = 128) -> NeuronEffects:
    """Zero each neuron in turn (all positions, clean run); copies of the batch carry one neuron each."""
    model.check_padding(data)
    layer = _layer(model, node)
    fn = get_metric(metric)
    neurons = torch.as_tensor(neurons).flatten()
    dev, N = model.device, len(data)
    clean, last = data.clean.to(dev), data.last.to(dev)
    pd = data.to(dev)
    clean_logits = last_logits(model, clean, last)
    m_clean = float(fn(clean_logits, pd, clean_logits).mean())
    m_corrupt = float(fn(last_logits(model, data.corrupted.to(dev), last), pd, clean_logits).mean())
    per = max(1, max_batch // N)
    vals = []
    for c0 in range(0, len(neurons), per):
        chunk = neurons[c0:c0 + per]

        def zero(act, hook, chunk=chunk):
            act = act.clone()
            for i, n in enumerate(chunk.tolist()):
                act[i * N:(i + 1) * N, :, n] = 0
            return act

        logits = last_logits(model, clean.repeat(len(chunk), 1), last.repeat(len(chunk)),
                             [(f"blocks.{layer}.mlp.hook_post", zero)])
        vals.append(fn(logits.view(len(chunk), N, -1), pd, clean_logits).mean(1).cpu())
    ablated = torch.cat(vals).float()
    effect = ablated - m_clean
    return NeuronEffects(f"m{layer}", neurons, m_clean, m_corrupt, ablated, effect, effect / (m_clean - m_corrupt))


def plot_neurons(activity: NeuronActivity, path, effects: NeuronEffects | None = None, title: str | None = None):
    """Bars of the top neurons' mean activation, and their ablation effect when given."""
    from matplotlib.figure import Figure

    from circuitgraph.plots import save

    k = len(activity.neurons)
    panels = 2 if effects is not None else 1
    fig = Figure(figsize=(max(4.5, 0.45 * k + 2) * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    labels = [str(int(n)) for n in activity.neurons]
    axes[0].bar(labels, activity.mean.numpy(), color="tab:blue", label="mean")
    axes[0].plot(labels, activity.max.numpy(), "k_", markersize=12, label="max")
    axes[0].set_xlabel("neuron"), axes[0].set_ylabel(f"activation ({activity.position} position)")
    axes[0].set_title(title or f"most active neurons of {activity.node}", fontsize=10)
    axes[0].legend(fontsize=8)
    if effects is not None:
        e_labels = [str(int(n)) for n in effects.neurons]
        vals = effects.normalised.numpy()
        axes[1].bar(e_labels, vals, color=["tab:red" if v < 0 else "tab:green" for v in vals])
        axes[1].axhline(0, color="black", lw=0.8)
        axes[1].set_xlabel("neuron"), axes[1].set_ylabel("normalised effect of zeroing")
        axes[1].set_title(f"zero-ablation of {effects.node} neurons (-1 = full corruption)", fontsize=10)
    return save(fig, path)


__all__ = ["NeuronActivity", "NeuronEffects", "neuron_ablation", "neuron_activations", "neuron_activations_of", "plot_neurons",
           "top_from", "top_neurons", "top_neurons_of"]
