"""Shared fixtures and helpers: tiny random-init models of each family, a word-level tokenizer, datasets,
TransformerLens hook patching and torch.distributed launch helpers."""

import json
import socket

import pytest
import torch
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast

torch.set_num_threads(1)  # the test models are tiny: threads only add synchronisation cost

WORDS = [f"w{i}" for i in range(40)]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<bos>": 1, "<pad>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", pad_token="<pad>")


VOCAB = len(WORDS) + 3


def gpt2_config():
    return GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=1,
                      architectures=["GPT2LMHeadModel"], initializer_range=0.15)


def llama_config():
    return LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=48,
                       vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=1, eos_token_id=1, pad_token_id=2,
                       attention_bias=True, architectures=["LlamaForCausalLM"], initializer_range=0.15)


def neox_config(parallel=True):
    return GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=48, vocab_size=VOCAB,
                         max_position_embeddings=32, rotary_pct=0.5, use_parallel_residual=parallel, bos_token_id=1,
                         eos_token_id=1, architectures=["GPTNeoXForCausalLM"], initializer_range=0.15)


def qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=32, intermediate_size=48,
                       vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=1, eos_token_id=1, pad_token_id=2,
                       architectures=["Qwen2ForCausalLM"], initializer_range=0.15, use_sliding_window=False)


SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=48,
             vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=1, eos_token_id=1, pad_token_id=2,
             initializer_range=0.15)
WINDOW = 3  # shorter than the test prompts, so a window that were ignored would show


def _cfg(cls_name, arch, **kw):
    import transformers

    return getattr(transformers, cls_name)(**{**SMALL, "architectures": [arch], **kw})


def rope_config(rope_type, **params):
    """Llama with a non-default RoPE; a short max_position_embeddings so prompts run past it."""
    return _cfg("LlamaConfig", "LlamaForCausalLM", max_position_embeddings=4,
                rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **params})


CONFIGS = {
    "gpt2": gpt2_config, "llama": llama_config, "qwen2": qwen2_config, "neox": neox_config, "neox-sequential": lambda: neox_config(False),
    "mistral": lambda: _cfg("MistralConfig", "MistralForCausalLM", sliding_window=WINDOW),
    "qwen2-window": lambda: _cfg("Qwen2Config", "Qwen2ForCausalLM", use_sliding_window=True, sliding_window=WINDOW,
                                 max_window_layers=1, attention_bias=True),
    "qwen3": lambda: _cfg("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    "gemma": lambda: _cfg("GemmaConfig", "GemmaForCausalLM", head_dim=8),
    "gemma2": lambda: _cfg("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=12,
                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3": lambda: _cfg("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=WINDOW,
                           layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: _cfg("Phi3Config", "Phi3ForCausalLM", partial_rotary_factor=0.5, original_max_position_embeddings=32),
    "olmo2": lambda: _cfg("Olmo2Config", "Olmo2ForCausalLM"),
    "llama-dynamic-rope": lambda: rope_config("dynamic", factor=2.0),
    "llama-yarn": lambda: rope_config("yarn", factor=2.0, original_max_position_embeddings=4),
    "llama3-rope": lambda: rope_config("llama3", factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=4),
    "llama-linear-rope": lambda: rope_config("linear", factor=2.0),
    "tracr": lambda: tracr_config(causal=False),
    "tracr-causal": lambda: tracr_config(causal=True),
}


def tracr_config(causal=False):
    """circuitgraph's normalisation-free model (tracr-compiled programs); bidirectional by default."""
    from circuitgraph.model.families.tracr import TracrConfig

    return TracrConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                       intermediate_size=48, max_position_embeddings=64, causal=causal, initializer_range=0.1,
                       architectures=["TracrForCausalLM"])


def randomize_norms(hf, seed=0, biases=False):
    """Random-init norms are identity maps (and biases zero), which would hide a norm or bias applied
    in the wrong place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln" in name or (biases and name.endswith("bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return hf


def tiny_hf(family, seed=0, attn="eager"):
    """A random-init HuggingFace model of ``family`` (a :data:`CONFIGS` key), seeded, with its norms and
    biases randomised too, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = CONFIGS[family]()
    cfg._attn_implementation = attn
    return randomize_norms(AutoModelForCausalLM.from_config(cfg).eval(), seed, biases=True)


def tiny_model(family, seed=0, tokenizer=None, double=False):
    """:func:`tiny_hf` as a CircuitModel (in float64 with ``double``): the model most engine tests run."""
    from circuitgraph.model.loading import CircuitModel

    hf = tiny_hf(family, seed)
    return CircuitModel(hf.double() if double else hf, tokenizer)


def tokens(seed, B=3, P=7):
    """Seeded random clean and corrupted token ids ``[B, P]`` (no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, P), generator=g), torch.randint(3, VOCAB, (B, P), generator=g)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A random GPT-2 saved as a local HuggingFace directory (config + safetensors + tokenizer)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    hf = randomize_norms(GPT2LMHeadModel(gpt2_config()))
    hf.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_rows(n, length=6, seed=0, positions=True):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        L = length + (i % 3)  # varying lengths exercise padding
        clean = [WORDS[j] for j in torch.randint(0, len(WORDS), (L,), generator=g)]
        corrupt = [WORDS[j] for j in torch.randint(0, len(WORDS), (L,), generator=g)]
        a, w = torch.randint(0, len(WORDS), (2,), generator=g).tolist()
        row = {"clean": " ".join(clean), "corrupted": " ".join(corrupt), "answer": WORDS[a], "wrong": WORDS[(w if w != a else a + 1) % len(WORDS)]}
        if positions:
            row["positions"] = {"S": 1, "END": L - 1}
        rows.append(row)
    return rows


@pytest.fixture
def dataset_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", random_rows(12))


def signal_rows(model, n, seed=0, length=6):
    """Random prompts whose answer is the clean run's top token and wrong the corrupted run's,
    so the task has a clean-vs-corrupted signal even in a random-init model."""
    rows = random_rows(n, length=length, seed=seed)
    tok = model.tokenizer
    for r in rows:
        with torch.no_grad():
            top = [int(model.hf(torch.tensor([tok(r[k])["input_ids"]])).logits[0, -1, 3:].argmax()) + 3
                   for k in ("clean", "corrupted")]
        if top[0] == top[1]:
            top[1] = 3 + (top[0] - 2) % (len(tok) - 3)
        r["answer"], r["wrong"] = tok.convert_ids_to_tokens(top)
    return rows


# ----- TransformerLens hook patching: the engine's edges written as hooks ---------------------------
def clean_and_corrupted_caches(bridge, data):
    """TransformerLens caches of a dataset's clean and corrupted prompts (no gradients)."""
    with torch.no_grad():
        return bridge.run_with_cache(data.clean)[1], bridge.run_with_cache(data.corrupted)[1]


def mean_logit_diff(data):
    """``logits [N, P, vocab] -> scalar``: the first answer's minus the first wrong token's logit at each row's last
    position, averaged (written here, apart from circuitgraph's metrics)."""
    def metric(logits):
        last = logits[torch.arange(len(data)), data.last]
        return (last.gather(1, data.answers[:, :1]) - last.gather(1, data.wrongs[:, :1])).mean()
    return metric


def source_output(cache, src):
    """A source node's output from a TransformerLens cache (the per-head result for a head)."""
    if src == "input":
        return cache["hook_embed"] + (cache["hook_pos_embed"] if "hook_pos_embed" in cache else 0)
    if src.startswith("m"):
        return cache[f"blocks.{src[1:]}.hook_mlp_out"]
    layer, head = src[1:].split(".h")
    return cache[f"blocks.{layer}.attn.hook_result"][:, :, int(head)]


def hook_for(dest):
    """``(TransformerLens hook, head or None)`` holding a destination's input."""
    if dest == "logits":
        return "ln_final.hook_in", None
    if dest.startswith("m"):
        return f"blocks.{dest[1:]}.ln2.hook_in", None
    layer, rest = dest[1:].split(".h")
    return f"blocks.{layer}.hook_{rest.split('<')[1][0]}_input", int(rest.split("<")[0])


def adder(delta, head):
    """A hook adding ``delta`` to a destination input (one head's slot of a per-head input)."""
    def patch(x, hook):
        x = x.clone()
        if head is None:
            x += delta
        else:
            x[:, :, head] += delta
        return x
    return patch


# ----- torch.distributed: several ranks on one machine ---------------------------------------------
WORLD = 2  # ranks the distributed tests launch


def free_port() -> int:
    """A TCP port free now on 127.0.0.1, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_alone_and_under_torchrun(args: list[str], out_dir):
    """One command line run as one process (``-o out_dir/one.json``) and under ``torchrun`` with
    :data:`WORLD` ranks (``-o out_dir/many.json``); both must succeed.  Returns the two finished processes."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "circuitgraph", *args, "-o", str(out_dir / "one.json")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert one.returncode == 0, one.stderr
    many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
                           "--master-port", str(free_port()), "-m", "circuitgraph", *args, "-o", str(out_dir / "many.json")],
                          capture_output=True, text=True, timeout=180, env=env)
    assert many.returncode == 0, many.stderr[-2000:]
    return one, many
