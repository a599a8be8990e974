"""Runs that compute only a circuit's nodes (the circuit, or the circuit without a few edges recomputing
only the changed nodes) against the by-hand forward pass."""

import pytest
import torch

from circuitgraph.engine.node_runs import NodeRuns
from conftest import CONFIGS, tiny_model, tokens
from reference import node_outputs, patched_forward

TOL = 1e-5  # against the by-hand forward, which sums in float32 in places
EXACT = 1e-10  # float64, against the engine's full patched run


def _sparse_circuit(G, density, seed):
    """A random circuit that reaches the logits through several nodes."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(len(G.sources), len(G.destinations), generator=g) < density) & G.legal
    mask[:, G.logits_dest] |= torch.rand(len(G.sources), generator=g) < 0.5
    mask[0, G.logits_dest] = False
    return mask


def _removals(G, mask, seed):
    """Three single edges, one node's edges (in and out) and an edge into the logits."""
    g = torch.Generator().manual_seed(seed)
    edges = [tuple(e) for e in torch.nonzero(mask).tolist()]
    pick = [edges[int(i)] for i in torch.randperm(len(edges), generator=g)[:3]]
    node = G.head_source(0, 1)
    head_dests = {G.head_dest(0, 1, p) for p in "qkv"}
    node_edges = [(s, d) for s, d in edges if s == node or d in head_dests]
    to_logits = [(s, d) for s, d in edges if d == G.logits_dest][:1]
    return [[e] for e in pick] + [node_edges, to_logits]


@pytest.mark.parametrize("family", [f for f in CONFIGS if f not in ("gemma2", "gemma3", "olmo2")])
@pytest.mark.parametrize("density", [0.15, 0.6])
def test_removal_runs_match_by_hand(family, density):
    m = tiny_model(family, seed=5, double=True)
    e, G = m.engine, m.graph
    assert NodeRuns.applies(e)
    clean, corrupt = tokens(3, B=3, P=7)
    last = torch.tensor([6, 4, 5])
    mask = _sparse_circuit(G, density, seed=int(density * 100))
    runs = NodeRuns(e, mask)
    corrupt_out = node_outputs(m.hf, corrupt)
    with torch.no_grad():
        _, outs = e.run(corrupt, record=True)
        abl = e.make_ablation(outs, "corrupted")
        deltas = e.patched_run(clean, abl, e.compile(mask[None]), stop_layer=G.n_layers).flat
        for removed in _removals(G, mask, seed=int(density * 10)):
            kept = mask.clone()
            for s, d in removed:
                kept[s, d] = False
            ref, _ = patched_forward(m.hf, clean, corrupt_out,
                                     lambda s, d: bool(kept[G.source_index[s], G.destination_index[d]]))
            ref = ref[torch.arange(3), last]
            got = runs.logits(clean, abl, last, deltas, removed)
            if got is None:  # nothing reaching the logits changed: the circuit's own logits
                own, _ = patched_forward(m.hf, clean, corrupt_out,
                                         lambda s, d: bool(mask[G.source_index[s], G.destination_index[d]]))
                assert (own[torch.arange(3), last] - ref).abs().max() < TOL
                continue
            assert (got - ref).abs().max() < TOL, removed
            full = e.patched_run(clean, abl, e.compile(kept[None]), logit_positions=last)[0]
            assert (got - full).abs().max() < EXACT, removed
            alone = NodeRuns(e, kept).logits(clean, abl, last)  # the reduced circuit run by its nodes alone
            assert (alone - full).abs().max() < EXACT, removed


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_removal_runs_under_mean_and_zero_ablation_equal_a_full_patched_run(kind):
    m = tiny_model("llama", seed=7, double=True)
    e, G = m.engine, m.graph
    clean, corrupt = tokens(4, B=2, P=6)
    last = torch.tensor([5, 3])
    mask = _sparse_circuit(G, 0.3, seed=1)
    with torch.no_grad():
        if kind == "mean":
            _, outs = e.run(corrupt, record=True)
            abl = e.make_ablation([o.mean(1, keepdim=True) for o in outs], "mean")
        else:
            abl = e.make_ablation(None, "zero")
        deltas = e.patched_run(clean, abl, e.compile(mask[None]), stop_layer=G.n_layers).flat
        runs = NodeRuns(e, mask)
        for removed in _removals(G, mask, seed=2):
            kept = mask.clone()
            for s, d in removed:
                kept[s, d] = False
            want = e.patched_run(clean, abl, e.compile(kept[None]), logit_positions=last)[0]
            got = runs.logits(clean, abl, last, deltas, removed)
            if got is not None:
                assert (got - want).abs().max() < EXACT
            assert (NodeRuns(e, kept).logits(clean, abl, last) - want).abs().max() < EXACT


def test_only_nodes_downstream_of_a_removal_that_reach_the_logits_are_recomputed():
    m = tiny_model("gpt2")
    G = m.graph
    a0, a1, m0, m1 = G.head_source(0, 0), G.head_source(1, 2), G.mlp_source(0), G.mlp_source(1)
    mask = torch.zeros(len(G.sources), len(G.destinations), dtype=torch.bool)
    for s, d in [(0, G.head_dest(0, 0, "v")), (a0, G.mlp_dest(0)), (m0, G.head_dest(1, 2, "q")),
                 (a1, G.logits_dest), (m0, G.mlp_dest(1))]:  # m1 reads m0 but feeds nothing
        mask[s, d] = True
    runs = NodeRuns(m.engine, mask)
    assert runs.changed([(0, G.head_dest(0, 0, "v"))]) == ([a0, m0, a1], True)
    assert runs.changed([(m0, G.mlp_dest(1))]) == ([], False)  # m1 reaches nothing
    assert runs.changed([(a1, G.logits_dest)]) == ([], True)
    assert not runs.everywhere[m0] and not runs.everywhere[a0]  # read at the answer position only (a query)
    assert not NodeRuns.applies(tiny_model("gemma2").engine)  # post-attention norms tie a layer's heads


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_values_without_recomputing_changed_nodes_equal_resumed_runs(family, monkeypatch, tokenizer):
    """The per-example metric without each node or edge (what effects are made of), from removal runs,
    equals that of the resumed full runs they replace, and the removals change it."""
    from circuitgraph.data.dataset import load_dataset
    from circuitgraph.evaluate.evaluator import Evaluator
    from conftest import signal_rows

    m = tiny_model(family, seed=2, tokenizer=tokenizer, double=True)
    ev = Evaluator(m, load_dataset(signal_rows(m, 7), m), batch_size=3, progress=False)
    mask = _sparse_circuit(m.graph, 0.3, seed=4)
    circuit = ev.resolve(mask)
    removals = list(ev._node_removals(circuit).values()) + [[k] for k in circuit.edges]
    with monkeypatch.context() as mp:  # a tiny model's removal runs cost mostly overhead: not chosen by themselves
        mp.setattr(NodeRuns, "cheaper", lambda self, removed, tokens, length: True)
        new = ev.values_without(mask, removals)
    monkeypatch.setattr(NodeRuns, "applies", staticmethod(lambda engine: False))
    old = ev.values_without(mask, removals)
    assert abs(new - old).max() < 1e-9
    own = ev.circuit_values(circuit)
    assert (abs(new - own).max(1) > 1e-3).sum() > len(removals) / 4


def test_removal_runs_are_chosen_for_a_sparse_circuit_and_not_for_a_nearly_complete_one():
    """Node effects of a sparse circuit recompute a few nodes; path patching's removals from the whole graph
    would recompute every later node, so they resume instead (GPT-2-small shape, 16 x 16 tokens)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from circuitgraph.model.loading import CircuitModel

    torch.manual_seed(0)
    m = CircuitModel(GPT2LMHeadModel(GPT2Config(n_layer=12)).eval(), check_exact=False)
    G = m.graph
    sparse = _sparse_circuit(G, 0.002, seed=3)
    runs = NodeRuns(m.engine, sparse)
    removals = [[(s, d)] for s, d in torch.nonzero(sparse).tolist() if d != G.logits_dest]  # inside the model
    assert sum(runs.cheaper(r, 256, 16) for r in removals) > 0.8 * len(removals)
    whole = NodeRuns(m.engine, G.legal)
    assert not any(whole.cheaper([(s, G.head_dest(6, 0, "q"))], 256, 16) for s in range(0, 60, 7))


def test_mask_values_of_circuits_run_by_their_nodes_equal_patched_runs(monkeypatch, tokenizer):
    import importlib

    from circuitgraph.data.dataset import load_dataset
    from circuitgraph.evaluate.evaluator import Evaluator
    from conftest import signal_rows

    m = tiny_model("qwen2", seed=4, tokenizer=tokenizer, double=True)
    ev = Evaluator(m, load_dataset(signal_rows(m, 7), m), batch_size=3, progress=False)
    masks = torch.stack([_sparse_circuit(m.graph, density, seed=i) for i, density in enumerate((0.05, 0.2, 0.4))])
    with monkeypatch.context() as mp:
        mp.setattr(NodeRuns, "cheaper", lambda self, removed, tokens, length: True)
        mp.setattr(importlib.import_module("circuitgraph.evaluate.scoring"), "NODE_RUNS_AT_MOST", 1.0)
        assert len(ev._node_runs(masks)) == 3
        by_nodes = ev.mask_values(masks)
    assert not ev._node_runs(masks)  # a tiny model's node runs cost mostly overhead: patched runs
    assert abs(by_nodes - ev.mask_values(masks)).max() < 1e-10
