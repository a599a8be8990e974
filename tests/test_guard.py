"""The run-time exactness guard stops runs whose engine forward differs from the HF model's."""

import pytest
import torch

import circuitgraph.model.families.llama as llama_family
from circuitgraph import Evaluator, CircuitSpec
from circuitgraph.data import tokenize, Example
from circuitgraph.model.guard import ExactnessError, check_exact
from circuitgraph.model.loading import CircuitModel
from conftest import CONFIGS, make_tokenizer, random_rows, randomize_norms, tiny_hf


def mistral(monkeypatch=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = CONFIGS["mistral"]()
    cfg._attn_implementation = "eager"
    return randomize_norms(AutoModelForCausalLM.from_config(cfg).eval())


def data(tok):
    return tokenize([Example(**r) for r in random_rows(4, length=8, positions=False)], tok)


def test_guard_catches_an_unmodelled_config_feature(monkeypatch):
    # a family adapter that forgets the sliding window: every number it produced would be wrong
    monkeypatch.setattr(llama_family, "layer_window", lambda config, attn, layer: None)
    tok = make_tokenizer()
    model = CircuitModel(mistral(), tok, name="mistral-window-ignored")
    with pytest.raises(ExactnessError, match=r"model 'mistral-window-ignored': the patching engine's clean logits differ .* by \d"):
        Evaluator(model, data(tok), progress=False)
    # switched off explicitly, it runs (and would be wrong)
    model = CircuitModel(mistral(), tok, name="unchecked", check_exact=False)
    Evaluator(model, data(tok), progress=False)


def test_guard_passes_exact_models_and_reports_the_difference():
    tok = make_tokenizer()
    model = CircuitModel(mistral(), tok)
    d = data(tok)
    assert check_exact(model, d.clean, d.last) < 1e-4
    ev = Evaluator(model, d, progress=False)
    assert d.clean.shape[1] in model._verified_lengths
    with pytest.warns(UserWarning):  # random model: no clean-vs-ablated signal
        assert ev.evaluate(CircuitSpec(edges=["input->logits"])).n_edges == 1


def test_a_model_accelerate_offloaded_is_refused(model_dir):
    """Offloaded weights sit on ``meta`` and arrive by hooks at each forward: the engine cannot read them."""
    from circuitgraph.model.loading import ModelLoadError, _refuse_offload, load_model

    m = load_model(model_dir, device_map={"": "cpu"})
    _refuse_offload(m.hf, "toy")  # all weights in place: nothing to refuse
    m.hf.hf_device_map = {"model": "cpu", "lm_head": "disk"}
    m.hf.lm_head.to("meta")
    with pytest.raises(ModelLoadError, match="model 'toy' does not fit on the devices: accelerate offloaded part of it to "
                                             "cpu and disk, which the engine cannot run"):
        _refuse_offload(m.hf, "toy")
    with pytest.raises(ModelLoadError, match="model 'mine' does not fit on the devices"):  # a model handed over as it is
        CircuitModel(m.hf, name="mine")


def test_device_auto_needs_gpus_and_no_launcher(monkeypatch, capsys):
    """``--device auto`` shards one model over the GPUs: a one-line refusal without any, or under torchrun."""
    from circuitgraph.cli.checks import CLIError, check_device

    with pytest.raises(CLIError, match="there are none; use --device cpu"):
        check_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_device("auto") == "auto"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CLIError, match="under torchrun each rank holds the whole model on its own GPU; use --device cuda"):
        check_device("auto")


def test_load_with_a_device_map(model_dir):
    """Sharding goes through HF accelerate; here every layer lands on the one CPU."""
    from circuitgraph.model.loading import load_model

    m = load_model(model_dir, device_map={"": "cpu"})
    x = torch.randint(3, 40, (2, 5))
    with torch.no_grad():
        assert (m.engine.run(x)[0] - m.hf(x).logits).abs().max() < 1e-4


# ----- reduced precision: judged against an fp32 forward of the same weights ------------------------
def test_upcast_on_use_is_an_fp32_forward_that_leaves_the_weights_alone():
    """The fp32 reference the guard uses: the bf16 weights in fp32 arithmetic, with no lasting change."""
    import copy

    from circuitgraph.model.guard import upcast_on_use

    hf = mistral().to(torch.bfloat16)
    before = [(p.data_ptr(), p.dtype) for p in hf.parameters()]
    x = torch.randint(3, 40, (2, 8))
    with torch.no_grad():
        with upcast_on_use(hf):
            got = hf(x).logits
        want = copy.deepcopy(hf).float()(x).logits
    assert got.dtype == torch.float32 and (got - want).abs().max() < 1e-5
    assert [(p.data_ptr(), p.dtype) for p in hf.parameters()] == before  # the engine shares these tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_guard_still_catches_an_unmodelled_feature(monkeypatch, dtype):
    """Judged against fp32, a dropped sliding window is tens of times HF's own rounding error: refused."""
    monkeypatch.setattr(llama_family, "layer_window", lambda config, attn, layer: None)
    tok = make_tokenizer()
    model = CircuitModel(mistral().to(dtype), tok, name="window-ignored")
    d = data(tok)
    with pytest.raises(ExactnessError, match=rf"model 'window-ignored': the patching engine's {str(dtype)[6:]} logits differ "
                                             r"from an fp32 forward of the same weights by [\d.]+, the model's own"):
        check_exact(model, d.clean, d.last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_guard_passes_a_correct_engine_past_the_old_tolerance(monkeypatch, dtype):
    """When engine and HF round apart by more than the tolerance (real checkpoints: Gemma-3 in bf16), the
    fp32 judgement accepts a correct engine; forced here with a tolerance no rounding meets."""
    import circuitgraph.model.guard as guard

    monkeypatch.setitem(guard.TOLERANCE, dtype, 1e-9)
    tok = make_tokenizer()
    model = CircuitModel(mistral().to(dtype), tok)
    d = data(tok)
    assert check_exact(model, d.clean, d.last) > 0  # judged, passed, and reports the difference from HF's forward


def test_float16_overflow_has_its_own_message():
    """HF's own float16 forward overflows (activations past 65504): say which dtype to use, not 'a feature'."""
    from transformers import AutoModelForCausalLM

    from circuitgraph.model.guard import OverflowInForward
    from conftest import CONFIGS

    torch.manual_seed(0)
    cfg = CONFIGS["llama"]()
    cfg._attn_implementation = "eager"
    hf = randomize_norms(AutoModelForCausalLM.from_config(cfg).eval())
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight.mul_(1e5)  # weights still fit float16; the activations do not
    tok = make_tokenizer()
    d = data(tok)
    with torch.no_grad():
        assert hf(d.clean).logits.isfinite().all()  # fine in float32
    model = CircuitModel(hf.to(torch.float16), tok, name="loud")
    with pytest.raises(OverflowInForward, match=r"^model 'loud': the model's own float16 forward gives inf/NaN logits on "
                                                r"prompts of length \d+; its activations exceed float16's range \(65504\); "
                                                r"load it in bfloat16 or float32 \(--dtype bfloat16\)$"):
        Evaluator(model, d, progress=False)


# ----- float64: the engine rounds where the model does ---------------------------------------------
ROPE_FAMILIES = [f for f in CONFIGS if f not in ("gpt2", "tracr", "tracr-causal")]  # all with rotary positions


def build64(family, attn="eager"):
    return tiny_hf(family, 0, attn).double()


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_float64_rope_families_pass_the_guard(family):
    """HF's eager attention takes its softmax in float32 even in a float64 model (2.5e-7 to 8e-7 of a logit on
    these models, against a tolerance of about 2.5e-8); the engine rounds there too, so the two agree exactly."""
    tok = make_tokenizer()
    model = CircuitModel(build64(family), tok, name=family)
    d = data(tok)
    assert check_exact(model, d.clean, d.last) <= 1e-12
    Evaluator(model, d, progress=False)


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("gpt2", "eager"), ("llama", "eager")])
def test_float64_softmax_follows_the_models_own_attention(family, attn):
    """HF's sdpa attention, and GPT-2's eager one, keep the softmax in float64: so does the engine, on its
    fused path and on the one that returns attention patterns."""
    model = CircuitModel(build64(family, attn), make_tokenizer())
    assert model.weights.layers[0].attn.softmax_fp32 == (attn == "eager" and family != "gpt2")
    d = data(model.tokenizer)
    assert check_exact(model, d.clean, d.last) <= 1e-12
    if attn == "eager":
        with torch.no_grad():
            want = model.hf(d.clean, output_attentions=True).attentions
            _, cache = model.engine.run_with_cache(d.clean, lambda n: n.endswith("hook_pattern"))
        for layer, w in enumerate(want):
            assert (cache[f"blocks.{layer}.attn.hook_pattern"] - w).abs().max() <= 1e-15


@pytest.mark.parametrize("family,wrong", [("llama", "theta"), ("gemma3", "theta"), ("phi3", "theta"),
                                          ("llama-linear-rope", "dropped scaling")])
def test_float64_guard_still_catches_a_wrong_rope(family, wrong):
    """An engine whose rotary table is off (theta 10100 for 10000: 6e-5 to 3e-3 of a logit; the linear
    scaling factor 2 dropped: 2.5) is refused in float64 as before."""
    import copy
    import math

    from circuitgraph.model.weights import Rotary

    class Unscaled(Rotary):
        def __call__(self, positions, like):
            return super().__call__(positions * 2, like)

    tok = make_tokenizer()
    model = CircuitModel(build64(family), tok, name="wrong-rope")
    for lw in model.weights.layers:
        r = lw.attn.rotary
        if wrong == "dropped scaling":
            lw.attn.rotary = Unscaled(r.module, r.layer_type)
            continue
        module = copy.deepcopy(r.module)  # the engine's own table, theta 10100: inv_freq = theta ** (-2i / d)
        for name, buf in list(module.named_buffers()):
            if name.endswith("inv_freq") and "original" not in name:
                setattr(module, name, buf ** (math.log(10100) / math.log(10000)))
        lw.attn.rotary = Rotary(module, r.layer_type)
    with pytest.raises(ExactnessError, match=r"model 'wrong-rope': the patching engine's clean logits differ .* by \d"):
        Evaluator(model, data(tok), progress=False)
