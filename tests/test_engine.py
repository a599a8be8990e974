"""The engine against an independent by-hand forward pass and against TransformerLens hooks."""

import pytest
import torch

from circuitgraph.model.loading import CircuitModel
from conftest import CONFIGS, adder, hook_for, source_output, tiny_model, tokens
from reference import node_outputs, patched_forward

TOL = 1e-4


def engine_logits(m, clean, corrupt, masks, pos=None):
    e = m.engine
    with torch.no_grad():
        _, outs = e.run(corrupt, record=True)
        abl = e.make_ablation(outs, "corrupted")
        return e.patched_run(clean, abl, e.compile(masks, pos, *clean.shape))


FAMILIES = list(CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_and_empty_circuit_equal_plain_model(family):
    m = tiny_model(family)
    clean, corrupt = tokens(1)
    G = m.graph
    full = torch.ones(1, len(G.sources), len(G.destinations), dtype=torch.bool)
    with torch.no_grad():
        ref_clean, ref_corrupt = m.hf(clean).logits, m.hf(corrupt).logits
    both = engine_logits(m, clean, corrupt, torch.cat([full, ~full]))
    assert (both[0] - ref_clean).abs().max() < TOL
    assert (both[1] - ref_corrupt).abs().max() < TOL
    assert (ref_clean - ref_corrupt).abs().max() > 0.1  # the check can fail


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_random_edge_subsets_match_by_hand(family, density):
    m = tiny_model(family, seed=3)
    clean, corrupt = tokens(2)
    G = m.graph
    g = torch.Generator().manual_seed(int(density * 100))
    masks = (torch.rand(2, len(G.sources), len(G.destinations), generator=g) < density) & G.legal
    masks[0, 0, G.logits_dest], masks[1, 0, G.logits_dest] = True, False  # input->logits
    got = engine_logits(m, clean, corrupt, masks)
    corrupt_out = node_outputs(m.hf, corrupt)
    for c in range(2):
        def keep(src, dst, c=c):
            return bool(masks[c, G.source_index[src], G.destination_index[dst]])
        ref, _ = patched_forward(m.hf, clean, corrupt_out, keep)
        assert (got[c] - ref).abs().max() < TOL
    # and the two circuits differ, so equality above is not vacuous
    assert (got[0] - got[1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_token_prompts_stacked_and_alone_match_by_hand(family):
    """One example of one token: every buffer layout coincides, so the run must not infer its path from strides."""
    m = tiny_model(family, seed=6)
    clean, corrupt = tokens(8, B=1, P=1)
    G = m.graph
    masks = (torch.rand(2, len(G.sources), len(G.destinations), generator=torch.Generator().manual_seed(3)) < 0.5) & G.legal
    corrupt_out = node_outputs(m.hf, corrupt)
    stacked, alone = engine_logits(m, clean, corrupt, masks), [engine_logits(m, clean, corrupt, masks[c:c + 1])[0] for c in range(2)]
    for c in range(2):
        ref, _ = patched_forward(m.hf, clean, corrupt_out, lambda s, d, c=c: bool(masks[c, G.source_index[s], G.destination_index[d]]))
        assert (stacked[c] - ref).abs().max() < TOL and (alone[c] - ref).abs().max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mix", ["sparse, in chunks", "sparse, token-major", "dense", "dense, row-major"])
def test_one_circuit_mixes_match_by_hand(family, mix, monkeypatch):
    """A single circuit takes its own path (a sparse or dense mix, on a CPU chunk by chunk); each
    destination gets its own density so ports on both bases and every mix size occur."""
    from circuitgraph.engine import one_circuit

    monkeypatch.setattr(one_circuit, "SPARSE_BELOW", 1.1 if mix.startswith("sparse") else 0.0)
    if mix == "sparse, in chunks":  # two token rows per chunk
        monkeypatch.setattr(one_circuit, "CPU_CHUNK_BYTES", 1)
        monkeypatch.setattr(one_circuit, "MIN_CHUNK_TOKENS", 2)
    if mix.startswith("sparse"):  # a sparse product one token row at a time
        monkeypatch.setattr(one_circuit, "SPARSE_OPERAND_BYTES", 1)
    m = tiny_model(family, seed=4)
    reused = m.engine.workspace
    monkeypatch.setattr(m.engine, "workspace", lambda *a: reused(*a).fill_(float("nan")))  # stale buffers must not leak
    clean, corrupt = tokens(3)
    G = m.graph
    g = torch.Generator().manual_seed(7)
    per_dst = torch.rand(1, 1, len(G.destinations), generator=g)
    per_dst[..., G.logits_dest] = 0.1  # few rows: a gathered mix
    for h in range(m.engine.H):  # every head's key port custom: grouped keys project with their own weights
        per_dst[..., G.head_dest(1, h, "k")] = 0.5
    mask = (torch.rand(1, len(G.sources), len(G.destinations), generator=g) < per_dst) & G.legal
    plan_ = m.engine.compile(mask)
    assert plan_.token_major == mix.startswith("dense")  # the buffer layout the plan's mixes favour
    plan_.token_major = mix in ("dense", "sparse, token-major")  # and the other, as a mixed plan may get
    mixed = [bp for bp in plan_.blocks if bp.mix is not None]
    assert all((bp.mix.layout == torch.sparse_csr) == mix.startswith("sparse") for bp in mixed if not bp.from_partial)
    assert any(bp.bases == ("A", "R") for bp in mixed)  # ports on both bases in one product
    assert any(bp.partial for bp in mixed)  # an MLP's sum over earlier rows made by its layer's heads
    if mix.startswith("dense"):
        assert any(bp.mix_rows is not None for bp in mixed) and any(bp.mix_rows is None for bp in mixed)
    e = m.engine
    projections = []  # layers whose attention output came from the output projection, not the heads' sum
    attn_out = e.kernel.attn_out
    monkeypatch.setattr(e.kernel, "attn_out", lambda layer, z: projections.append(layer) or attn_out(layer, z))
    with torch.no_grad():
        abl = e.make_ablation(e.run(corrupt, record=True)[1], "corrupted")
        projections.clear()
        got = e.patched_run(clean, abl, plan_)[0]
        last = torch.full((clean.shape[0],), clean.shape[1] - 1)
        at_last = e.patched_run(clean, abl, plan_, logit_positions=last)[0]
    summable = [layer for layer, lw in enumerate(e.w.layers)
                if len(plan_.needed[1 + 2 * layer]) == e.H and lw.post_attn is None]
    assert summable or any(lw.post_attn is not None for lw in e.w.layers)
    assert not set(summable) & set(projections)  # every head's output in the buffer: their sum is the attention output
    ref, _ = patched_forward(m.hf, clean, node_outputs(m.hf, corrupt),
                             lambda s, d: bool(mask[0, G.source_index[s], G.destination_index[d]]))
    assert (got - ref).abs().max() < TOL
    assert (at_last - ref[:, -1]).abs().max() < TOL
    e.release_workspace()
    assert not e._workspace


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_one_circuit_executor_equals_the_stacked_reference(family, density):
    """One circuit runs on the one-circuit executor; the stacked reference (its plan without the
    one-circuit products) gives the same logits, from the embedding, resumed and paused."""
    from circuitgraph.engine.patched_run import PatchedRun
    from circuitgraph.engine.plan import compile_plan

    m = tiny_model(family, seed=6, double=True)
    e, G = m.engine, m.graph
    clean, corrupt = tokens(5)
    g = torch.Generator().manual_seed(int(density * 100))
    mask = (torch.rand(1, len(G.sources), len(G.destinations), generator=g) < density) & G.legal
    with torch.no_grad():
        abl = e.make_ablation(e.run(corrupt, record=True)[1], "corrupted")
        fast_plan, reference_plan = e.compile(mask), compile_plan(e, mask)
        assert any(bp.mix is not None for bp in fast_plan.blocks) and all(bp.mix is None for bp in reference_plan.blocks)
        fast = e.patched_run(clean, abl, fast_plan)
        reference = PatchedRun(e, clean, abl, reference_plan).run()
        assert (fast - reference).abs().max() < 1e-10
        last = torch.full((clean.shape[0],), clean.shape[1] - 1)
        paused = e.pause(clean, abl, fast_plan, 1)
        reference_pause = PatchedRun(e, clean, abl, reference_plan, None, None, 1).run()
        assert (paused.flat - reference_pause.flat).abs().max() < 1e-10
        resumed = e.patched_run(clean, abl, fast_plan, logit_positions=last, start=paused)
        assert (resumed - PatchedRun(e, clean, abl, reference_plan, last, reference_pause).run()).abs().max() < 1e-10


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_position_restricted_edges_match_by_hand(family):
    m = tiny_model(family, seed=5)
    clean, corrupt = tokens(4)
    B, P = clean.shape
    G = m.graph
    g = torch.Generator().manual_seed(7)
    masks = (torch.rand(1, len(G.sources), len(G.destinations), generator=g) < 0.3) & G.legal
    cand = torch.nonzero(G.legal & ~masks[0])
    chosen = cand[torch.randperm(len(cand), generator=g)[:25]]
    pos = {}
    for s, d in chosen.tolist():
        pm = torch.zeros(B, P, dtype=torch.bool)
        pm[torch.arange(B), torch.randint(0, P, (B,), generator=g)] = True
        pm[:, -1] = True
        pos[(s, d)] = pm
    got = engine_logits(m, clean, corrupt, masks, pos)[0]
    corrupt_out = node_outputs(m.hf, corrupt)

    def keep(src, dst):
        s, d = G.source_index[src], G.destination_index[dst]
        if (s, d) in pos:
            return pos[(s, d)]
        return bool(masks[0, s, d])

    ref, _ = patched_forward(m.hf, clean, corrupt_out, keep)
    assert (got - ref).abs().max() < TOL
    without = engine_logits(m, clean, corrupt, masks)[0]
    assert (got - without).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_mean_and_zero_ablation_match_by_hand(kind):
    m = tiny_model("gpt2", seed=9)
    clean, corrupt = tokens(6)
    G, e = m.graph, m.engine
    masks = (torch.rand(1, len(G.sources), len(G.destinations), generator=torch.Generator().manual_seed(1)) < 0.4) & G.legal
    ref_out = node_outputs(m.hf, corrupt)
    if kind == "mean":
        ablated = {k: v.mean(0, keepdim=True) for k, v in ref_out.items()}
        with torch.no_grad():
            _, outs = e.run(corrupt, record=True)
        abl = e.make_ablation([o.mean(1, keepdim=True) for o in outs], "mean")
    else:
        ablated = {k: torch.zeros_like(v) for k, v in ref_out.items()}
        abl = e.make_ablation(None, "zero")
    with torch.no_grad():
        got = e.patched_run(clean, abl, e.compile(masks))[0]
    ref, _ = patched_forward(m.hf, clean, ablated, lambda s, d: bool(masks[0, G.source_index[s], G.destination_index[d]]))
    assert (got - ref).abs().max() < TOL


@pytest.mark.parametrize("family", ["gpt2", "neox-sequential"])
@pytest.mark.parametrize("edge", ["a0.h1->a1.h2<k>", "input->a1.h0<q>", "a0.h3->a1.h1<v>", "m0->logits", "a1.h2->m1", "a0.h0->m0"])
def test_removing_one_edge_matches_transformerlens_hook_patch(family, edge):
    m = tiny_model(family, seed=11)
    clean, corrupt = tokens(8)
    G = m.graph
    s, d = G.edge_index[edge]
    masks = G.legal.clone()[None]
    masks[0, s, d] = False
    got = engine_logits(m, clean, corrupt, masks)[0]

    bridge = m.bridge
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
        _, corrupt_cache = bridge.run_with_cache(corrupt)
    src, dst = edge.split("->")
    diff = source_output(corrupt_cache, src) - source_output(clean_cache, src)
    hook, head = hook_for(dst)

    with torch.no_grad():
        ref = bridge.run_with_hooks(clean, fwd_hooks=[(hook, adder(diff, head))])
        plain = bridge(clean)
    assert (got - ref).abs().max() < TOL
    assert (ref - plain).abs().max() > 1e-4  # the edge matters, so the comparison is informative


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_resuming_from_a_clean_prefix_state_matches_a_full_run(family):
    """ACDC's trials resume at a layer; edges into that layer and later may differ freely."""
    m = tiny_model(family, seed=13)
    e, G = m.engine, m.graph
    clean, corrupt = tokens(9)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        _, outs = e.run(corrupt, record=True)
        abl = e.make_ablation(outs, "corrupted")
        _, clean_outs = e.run(clean, record=True)
        states = e.clean_states(clean_outs, abl)
        for layer, state in enumerate(states):
            masks = (torch.rand(3, len(G.sources), len(G.destinations), generator=g) < 0.5) & G.legal
            first = G.head_dest(layer, 0, "q") if layer < len(states) - 1 else G.logits_dest
            masks[:, :, :first] = G.legal[:, :first]  # before the layer: the full (clean) circuit
            for C in (1, 3):
                plan = e.compile(masks[:C])
                resumed = e.patched_run(clean, abl, plan, start=state)
                assert (resumed - e.patched_run(clean, abl, plan)).abs().max() < TOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_pause_carried_on_from_an_earlier_pause_matches_one_from_the_embedding(family):
    """Effects pause the circuit's run at each layer a removal starts in, each pause carried on from the
    last: the state, and the trials resumed from it (one circuit: deltas copied into its buffer; three:
    read from the state), equal those of a pause run from the embedding."""
    m = tiny_model(family, seed=19)
    e, G = m.engine, m.graph
    clean, corrupt = tokens(11)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        _, outs = e.run(corrupt, record=True)
        abl = e.make_ablation(outs, "corrupted")
        mask = (torch.rand(len(G.sources), len(G.destinations), generator=g) < 0.4) & G.legal
        base = e.compile(mask[None])
        first = e.patched_run(clean, abl, base, stop_layer=0)
        later = e.patched_run(clean, abl, base, start=first, stop_layer=1)
        direct = e.patched_run(clean, abl, base, stop_layer=1)
        assert later.layer == direct.layer == 1 and len(later.deltas) == len(direct.deltas)
        assert (later.resid - direct.resid).abs().max() < TOL and (later.flat - direct.flat).abs().max() < TOL
        trials = mask[None].repeat(3, 1, 1)
        trials[:, :, G.head_dest(1, 0, "q"):] = torch.rand(3, len(G.sources), len(G.destinations) - G.head_dest(1, 0, "q"),
                                                          generator=g) < 0.4
        trials &= G.legal
        for C in (1, 3):
            plan = e.compile(trials[:C])
            expected = e.patched_run(clean, abl, plan)
            for state in (later, direct):
                assert (e.patched_run(clean, abl, plan, start=state) - expected).abs().max() < TOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_last_position_logits_equal_the_full_run_at_those_positions(family, density):
    """The final residual is built only where it is read; that must not change any number."""
    m = tiny_model(family, seed=17)
    e, G = m.engine, m.graph
    clean, corrupt = tokens(10)
    B, P = clean.shape
    pos = torch.tensor([P - 1, P - 3, 2])
    g = torch.Generator().manual_seed(int(density * 100))
    with torch.no_grad():
        _, outs = e.run(corrupt, record=True)
        abl = e.make_ablation(outs, "corrupted")
        _, clean_outs = e.run(clean, record=True)
        states = e.clean_states(clean_outs, abl)
        masks = (torch.rand(3, len(G.sources), len(G.destinations), generator=g) < density) & G.legal
        masks[1:, :, :G.logits_dest] = masks[0, :, :G.logits_dest]  # circuits differ only at the logits
        for C in (1, 3):
            plan = e.compile(masks[:C])
            full = e.patched_run(clean, abl, plan)[:, torch.arange(B), pos]
            assert (e.patched_run(clean, abl, plan, logit_positions=pos) - full).abs().max() < TOL
        full_circuit = G.legal.clone()[None].repeat(3, 1, 1)
        full_circuit[:, :, G.logits_dest] = masks[:, :, G.logits_dest]
        plan = e.compile(full_circuit)
        expected = e.patched_run(clean, abl, plan)[:, torch.arange(B), pos]
        got = e.patched_run(clean, abl, plan, logit_positions=pos, start=states[-1])
        assert (got - expected).abs().max() < TOL


def test_every_registered_family_has_a_test_entry():
    """Adding a family means adding it to CONFIGS, which runs every check in this file on it."""
    from circuitgraph.model.families import REGISTRY

    tested = {CONFIGS[name]().architectures[0] for name in CONFIGS}
    assert set(REGISTRY) <= tested, sorted(set(REGISTRY) - tested)


@pytest.mark.parametrize("family", ["gpt2", "neox"])
@pytest.mark.parametrize("activation", ["gelu_new", "gelu_fast", "relu"])
def test_mlp_activation_runs_fused_only_where_it_is_the_tanh_gelu(family, activation):
    """HF's unfused tanh-GELU formulas run as PyTorch's fused kernel (the same function to float
    rounding); any other activation runs in HF's own module."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = CONFIGS[family]()
    setattr(cfg, "activation_function" if family == "gpt2" else "hidden_act", activation)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf_mlp = hf.transformer.h[0].mlp if family == "gpt2" else hf.gpt_neox.layers[0].mlp
    layer = CircuitModel(hf).engine.w.layers[0]
    x = torch.randn(2, 5, hf.config.hidden_size) * 4
    with torch.no_grad():
        assert (layer.mlp(x) - hf_mlp(x)).abs().max() < 1e-5
    assert (layer.mlp is hf_mlp) == (activation == "relu")


def test_fused_tanh_gelu_differs_from_hf_formula_by_rounding_only():
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-30, 30, 600_001)
    diff = (torch.nn.functional.gelu(x, approximate="tanh") - NewGELUActivation()(x)).abs().max()
    assert diff <= 5e-7, diff  # docs/engine.md states 4.8e-7
