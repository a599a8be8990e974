"""Linear probes: is a label linearly decodable from a node's output?

A multinomial logistic regression (torch, full-batch L-BFGS, L2 penalty) on standardised
features, trained on a random split and scored on the held-out part.  Report test accuracy next
to ``chance`` (the majority class share of the test set): a probe only says something when it
clearly beats chance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitgraph.data.dataset import TaskData
from circuitgraph.model.loading import CircuitModel


@torch.no_grad()
def node_activations(model: CircuitModel, data: TaskData, node: str, position: str | int = "last",
                     which: str = "clean") -> torch.Tensor:
    """A node's output ``[N, d_model]`` at one position per example (``last``, a named position or an index)."""
    G = model.graph
    G.check_node(node)
    if node == "logits":
        raise ValueError("probe: 'logits' is not a node with an output in the residual stream")
    tokens = data.clean if which == "clean" else data.corrupted
    _, outs = model.engine.run(tokens.to(model.device), record=True)
    s = G.source_index[node]
    block = model.engine.source_block_of(s)
    out = outs[block][s - model.engine.src_blocks[block].start]  # [N, P, D]
    N = len(data)
    if position == "last":
        idx = data.last
    elif isinstance(position, int):
        idx = torch.full((N,), position)
    else:
        if position not in data.positions:
            raise ValueError(f"position '{position}' is not named in the dataset (it names: {', '.join(sorted(data.positions)) or 'none'})")
        idx = data.positions[position]
    return out[torch.arange(N), idx.to(out.device)].float().cpu()


@dataclass
class ProbeResult:
    """A fitted logistic-regression probe with its train and test
    accuracy beside chance, so a high score can be judged."""

    train_accuracy: float
    test_accuracy: float
    chance: float  # majority-class share of the test set
    n_train: int
    n_test: int
    n_classes: int
    classes: torch.Tensor  # the label values, in the order of the probe's outputs
    weight: torch.Tensor  # [n_classes, d] on standardised features
    bias: torch.Tensor  # [n_classes]
    mean: torch.Tensor  # feature standardisation
    std: torch.Tensor

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Class labels of activations ``X [n, d]``, standardised as the training data was."""
        return self.classes[(((X.float() - self.mean) / self.std) @ self.weight.T + self.bias).argmax(-1)]


def train_probe(X: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.25, weight_decay: float = 1e-3,
                steps: int = 100, seed: int = 0) -> ProbeResult:
    """Fit a logistic-regression probe ``X [n, d] -> y [n]`` (integer labels) on a random train/test split."""
    X, y = X.float(), torch.as_tensor(y).long()
    n = len(X)
    if n < 4:
        raise ValueError(f"a probe needs at least 4 examples, got {n}")
    classes, y = torch.unique(y, return_inverse=True)
    C = len(classes)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = X[train].mean(0), X[train].std(0).clamp(min=1e-6)
    Z = (X - mean) / std
    W = torch.zeros(C, X.shape[1], requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Z[train] @ W.T + b, y[train]) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (Z @ W.T + b).argmax(-1)
        acc = lambda idx: float((pred[idx] == y[idx]).float().mean())
        chance = float(torch.bincount(y[test], minlength=C).max()) / len(test)
    return ProbeResult(acc(train), acc(test), chance, len(train), len(test), C, classes, W.detach(), b.detach(), mean, std)


def probe_node(model: CircuitModel, data: TaskData, node: str, labels, position: str | int = "last", **kw) -> ProbeResult:
    """Train a probe for ``labels [N]`` on ``node``'s output at ``position`` (see :func:`train_probe`)."""
    return train_probe(node_activations(model, data, node, position), torch.as_tensor(labels), **kw)


__all__ = ["ProbeResult", "node_activations", "probe_node", "train_probe"]
