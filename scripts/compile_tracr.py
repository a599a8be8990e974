"""Compile RASP programs with tracr into bundled known-answer models.

tracr (Lindner et al. 2023) turns a RASP program into transformer weights in which every head and
MLP has a known role, so the program's true circuit is known exactly.  For each program this
script writes ``circuitgraph/bundled/tracr-<name>/`` (config.json + model.safetensors for
:class:`circuitgraph.model.families.tracr.TracrForCausalLM`, a word-level tokenizer over the
program's vocabulary, ``tracr.json`` with a test set of inputs, tracr's own evaluator outputs and
the compiled model's output units, and ``metrics.json``) and the ground-truth circuit
``circuitgraph/specs/tracr_<name>.json``.

tracr and its JAX dependencies are not circuitgraph dependencies; run this in its own environment::

    python3 -m venv /work/tracr-venv
    /work/tracr-venv/bin/pip install tracr-pypi safetensors transformers
    /work/tracr-venv/bin/python scripts/compile_tracr.py

The ground truth is read from the compiler's craft model: every block reads and writes named
residual directions (one per value of each RASP variable), so an edge ``src -> dst<port>`` is in
the circuit exactly when ``src`` writes a direction that ``dst`` reads through that port.  Every
other edge carries exactly zero into what its destination reads, which makes the spec exact
under zero ablation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import save_file
from tracr.compiler import assemble, basis_inference, craft_graph_to_model, craft_model_to_transformer
from tracr.compiler import expr_to_craft_graph, lib, nodes, rasp_to_graph
from tracr.craft import bases, transformers
from tracr.rasp import rasp

ROOT = Path(__file__).resolve().parents[1]
BOS, PAD, UNK = "BOS", "PAD", "UNK"
MLP_EXACTNESS = 100


@dataclass
class Program:
    name: str
    make: Callable[[], rasp.SOp]
    vocab: list[str]
    max_seq_len: int
    causal: bool
    description: str
    unique_tokens: bool = False  # inputs without repeated tokens (sort_unique needs unique keys)
    task_length: int | None = None  # input length of the task's datasets (default: max_seq_len)


def _frac_prevs():
    is_x = rasp.numerical(rasp.Map(lambda t: 1 if t == "x" else 0, rasp.tokens)).named("is_x")
    return lib.make_frac_prevs(is_x).named("frac_prevs")


def _reverse():
    return lib.make_reverse(rasp.tokens).named("reverse")


def _sort():
    return lib.make_sort_unique(rasp.tokens, rasp.tokens).named("sort")


def _shift2():
    prev = rasp.Select(rasp.indices, rasp.indices, lambda k, q: q == k + 1).named("prev_pos")
    prev_token = rasp.Aggregate(prev, rasp.tokens, default=None).named("prev_token")
    prev2 = rasp.Select(rasp.indices, rasp.indices, lambda k, q: q == k + 1).named("prev_pos2")
    return rasp.Aggregate(prev2, prev_token, default=None).named("shift2")


PROGRAMS = [
    Program("frac_prevs", _frac_prevs, ["a", "b", "c", "x"], 5, True,
            "fraction of the tokens so far that are 'x' (the ACDC paper's tracr xproportion): an MLP computes "
            "is_x, one head averages it over the previous positions"),
    Program("reverse", _reverse, ["a", "b", "c"], 5, False,
            "the input reversed: a head and an MLP count the length (SelectorWidth), MLPs compute the opposite "
            "index, a second head reads the token there (attention -> MLP -> attention); its task uses 4-token "
            "inputs, because at the maximum length a zero-ablated length count decodes as that maximum, which is "
            "right by accident", task_length=4),
    Program("sort", _sort, ["a", "b", "c", "d", "e", "f", "g", "h"], 5, False,
            "the tokens sorted (distinct tokens; tracr's make_sort_unique): a head and an MLP count the smaller "
            "tokens (SelectorWidth), a second head moves each token to that position", unique_tokens=True),
    Program("shift2", _shift2, ["a", "b", "c"], 5, True,
            "the token two places back, as two composed previous-token heads: the second head's value reads "
            "the first head's output (head -> head composition)"),
]


# ---------------------------------------------------------------- compiling


def compile_program(program: rasp.SOp, vocab: set, max_seq_len: int, causal: bool):
    """``compiling.compile_rasp_to_model``, step by step, keeping the craft model for the ground truth."""
    extracted = rasp_to_graph.extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    basis_inference.infer_bases(graph, sink, vocab, max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(
        graph, bos_dir=bases.BasisDirection(rasp.tokens.label, BOS), mlp_exactness=MLP_EXACTNESS)
    craft_model = craft_graph_to_model.craft_graph_to_model(graph, sources)
    assembled = craft_model_to_transformer.craft_model_to_transformer(
        craft_model=craft_model, graph=graph, sink=sink, max_seq_len=max_seq_len, causal=causal,
        compiler_bos=BOS, compiler_pad=PAD)
    return assembled, craft_model, graph, sink


def _dirs(space) -> set:
    return set(space.basis)


def _used(space, matrix, axis: int) -> set:
    """Directions of ``space`` that ``matrix`` actually uses (a non-zero row for axis 0, column for 1):
    a direction a block's space names but its weights ignore carries nothing."""
    m = np.abs(np.asarray(matrix))
    nonzero = (m > 0).any(axis=1 - axis)
    return {d for d, used in zip(space.basis, nonzero) if used}


def block_roles(graph) -> list[tuple[str, str, set]]:
    """(RASP label, 'attn'/'mlp', output directions) of every compiled block."""
    out = []
    for label, node in graph.nodes.items():
        block = node.get(nodes.MODEL_BLOCK)
        if block is None:
            continue
        parts = block.blocks if isinstance(block, transformers.SeriesWithResiduals) else [block]
        for part in parts:
            if isinstance(part, transformers.MLP):
                out.append((label, "mlp", _dirs(part.snd.output_space)))
            else:
                for head in part.as_multi().heads():
                    out.append((label, "attn", _dirs(head.w_ov.output_space)))
    return out


def components(assembled, craft_model, graph, sink, max_seq_len: int) -> tuple[dict, dict, dict]:
    """Per node: directions written; per destination port: directions read; per node: RASP roles."""
    _, module_names = assemble._get_model_config_and_module_names(craft_model)
    roles = block_roles(graph)
    labels = lambda written, kind: sorted({re.sub(r"_\d+$", "", lab) for lab, k, w in roles if k == kind and w & written})
    tokens = [bases.BasisDirection(rasp.tokens.label, v) for v in assembled.input_encoder.encoding_map]
    indices = [bases.BasisDirection(rasp.indices.label, i) for i in range(max_seq_len)]
    one = [bases.BasisDirection("one")] if "one" in assembled.residual_labels else []
    writes = {"input": set(tokens) | set(indices) | set(one)}
    reads = {"logits": _dirs(bases.VectorSpaceWithBasis(sink[nodes.OUTPUT_BASIS]))}
    role = {"input": ["tokens", "indices"] + (["one"] if one else [])}
    for name, block in zip(module_names, craft_model.blocks):
        layer = int(name.split("/")[1].split("_")[1])
        if isinstance(block, transformers.MLP):
            node = f"m{layer}"
            writes[node] = _used(block.snd.output_space, block.snd.matrix, 1)
            reads[node] = _used(block.fst.input_space, block.fst.matrix, 0)
            role[node] = labels(writes[node], "mlp")
        else:
            for h, head in enumerate(block.as_multi().heads()):
                node = f"a{layer}.h{h}"
                writes[node] = _used(head.w_ov.output_space, head.w_ov.matrix, 1)
                reads[f"{node}<q>"] = _used(head.w_qk.left_space, head.w_qk.matrix, 0)
                reads[f"{node}<k>"] = _used(head.w_qk.right_space, head.w_qk.matrix, 1)
                reads[f"{node}<v>"] = _used(head.w_ov.input_space, head.w_ov.matrix, 0)
                role[node] = labels(writes[node], "attn")
    return writes, reads, role


def _order(node: str) -> tuple[int, int]:
    """(layer, 0 for heads / 1 for the MLP) of a node; input first, logits last."""
    if node == "input":
        return (-1, 1)
    if node.startswith("logits"):
        return (10**6, 0)
    base = node.split("<")[0]
    if base.startswith("m"):
        return (int(base[1:]), 1)
    return (int(base[1:].split(".")[0]), 0)


def ground_truth(writes: dict, reads: dict) -> list[dict]:
    """Edges whose source writes a direction the destination port reads (and may read, by layer order)."""
    edges = []
    for dst, read in reads.items():
        dl, dk = _order(dst)
        for src, written in writes.items():
            sl, sk = _order(src)
            before = sl < dl or (sl == dl and sk == 0 and dk == 1 and dst.startswith("m")) or src == "input"
            shared = written & read
            if before and shared:
                edges.append({"edge": f"{src}->{dst}", "directions": sorted(str(d) for d in shared)})
    return edges


# ---------------------------------------------------------------- inputs and outputs


def test_inputs(p: Program, rng: random.Random, n_full: int = 200, n_short: int = 12) -> list[list[str]]:
    """Inputs at full length (all of them if few) and a few at each shorter length."""
    def sample(length, n):
        if p.unique_tokens:
            pool = list(itertools.permutations(p.vocab, length))
        else:
            pool = list(itertools.product(p.vocab, repeat=length))
        pool = [list(x) for x in pool]
        return pool if len(pool) <= n else rng.sample(pool, n)
    task_length = p.task_length or p.max_seq_len
    out = sample(task_length, n_full)
    for length in range(1, p.max_seq_len + 1):
        if length != task_length:
            out += sample(length, n_short)
    return out


def output_units(assembled, sink, x: np.ndarray) -> np.ndarray:
    """The compiled model's output units (what tracr argmaxes, or its number) for one input [1, T, D] residual."""
    idx = [assembled.residual_labels.index(str(d)) for d in sink[nodes.OUTPUT_BASIS]]
    return x[..., idx]


def run_tracr(assembled, sink, inp: list[str]):
    out = assembled.apply([BOS] + inp)
    units = output_units(assembled, sink, np.asarray(out.transformer_output))[0]
    return out.decoded, units


# ---------------------------------------------------------------- writing a bundle


def tokenizer_vocab(assembled, sink, categorical: bool, name: str) -> tuple[dict, list]:
    """Token -> id (tracr's input ids first, so embeddings line up), and the output tokens in unit order."""
    vocab = {str(k): v for k, v in assembled.input_encoder.encoding_map.items()}
    if categorical:
        out_tokens = [str(d.value) for d in sink[nodes.OUTPUT_BASIS]]
    else:
        out_tokens = [name]
    for t in out_tokens + [UNK]:
        vocab.setdefault(t, len(vocab))
    return vocab, out_tokens


def save_tokenizer(vocab: dict, path: Path, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, pad_token=PAD, unk_token=UNK,
                                   model_max_length=max_len)
    fast.save_pretrained(path)


def hf_weights(assembled, vocab: dict, out_tokens: list, sink) -> tuple[dict, dict]:
    """tracr's haiku parameters as TracrForCausalLM tensors (same numbers, torch layout) and its config."""
    params = {k: {p: np.asarray(v, dtype=np.float32) for p, v in d.items()} for k, d in assembled.params.items()}
    cfg = assembled.model_config
    D = len(assembled.residual_labels)
    tok = params["token_embed"]["embeddings"]
    embed = np.zeros((len(vocab), D), np.float32)
    embed[: tok.shape[0]] = tok  # output-only and UNK tokens embed to zero
    lm_head = np.zeros((len(vocab), D), np.float32)
    for t, d in zip(out_tokens, sink[nodes.OUTPUT_BASIS]):
        lm_head[vocab[t], assembled.residual_labels.index(str(d))] = 1.0
    w = {"embed_tokens.weight": embed, "embed_positions.weight": params["pos_embed"]["embeddings"],
         "lm_head.weight": lm_head}
    for L in range(cfg.num_layers):
        pre = f"transformer/layer_{L}"
        for ours, theirs in (("attn.q_proj", "attn/query"), ("attn.k_proj", "attn/key"), ("attn.v_proj", "attn/value"),
                             ("attn.o_proj", "attn/linear"), ("mlp.fc_in", "mlp/linear_1"), ("mlp.fc_out", "mlp/linear_2")):
            w[f"layers.{L}.{ours}.weight"] = np.ascontiguousarray(params[f"{pre}/{theirs}"]["w"].T)
            w[f"layers.{L}.{ours}.bias"] = params[f"{pre}/{theirs}"]["b"]
    config = {
        "architectures": ["TracrForCausalLM"], "model_type": "circuitgraph_tracr",
        "vocab_size": len(vocab), "hidden_size": D, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "head_dim": cfg.key_size, "intermediate_size": cfg.mlp_hidden_size,
        "max_position_embeddings": int(params["pos_embed"]["embeddings"].shape[0]), "causal": bool(cfg.causal),
        "bias": True, "bos_token_id": vocab[BOS], "pad_token_id": vocab[PAD], "tie_word_embeddings": False,
        "dtype": "float32",
    }
    return w, config


def spec_json(p: Program, edges: list[dict], role: dict, categorical: bool) -> dict:
    ends = {e["edge"].split("->")[0] for e in edges} | {e["edge"].split("->")[1].split("<")[0] for e in edges}
    used = sorted(ends - {"input", "logits"}, key=_order)
    metric = "logit_diff (answer: the program's output at the last position; wrong: the other output values)" \
        if categorical else f"logit_diff (the '{p.name}' output unit minus BOS's, which is identically 0: the output number itself)"
    return {
        "format": "circuitgraph/1",
        "name": f"tracr {p.name} ground truth",
        "model": f"tracr-{p.name}",
        "task": "tracr",
        "source": "Compiled with tracr (Lindner et al. 2023, Tracr: Compiled Transformers as a Laboratory for "
                  "Interpretability) by scripts/compile_tracr.py; ground truth read from the compiler's craft model, "
                  "as in the ACDC paper's tracr experiments (Conmy et al. 2023).",
        "description": (
            f"{p.description}. An edge is in the circuit exactly when its source writes a residual direction that its "
            "destination port reads (tracr gives every value of every RASP variable its own direction); every other "
            "edge carries exactly zero into what its destination reads. The spec is therefore exact under zero "
            "ablation (--ablation zero): faithfulness 1 and complement 0 on every input, up to float rounding. "
            "A compiled edge can still be idle on a given input set (the query and key of a head that selects every "
            "position give constant scores); benchmarks/known_circuits.py reports such edges. "
            f"Metric: {metric}."),
        "groups": {f"{', '.join(role[n])} ({n})": {"nodes": [n]} for n in used},
        "edges": [e["edge"] for e in edges],
        "metadata": {"ablation": "zero", "metric": "logit_diff", "program": p.name,
                     "edge_directions": {e["edge"]: e["directions"] for e in edges},
                     "roles": {n: role[n] for n in ["input"] + used}},
    }


def build(p: Program, bundled: Path, specs: Path, seed: int = 0) -> dict:
    prog = p.make()
    assembled, craft_model, graph, sink = compile_program(prog, set(p.vocab), p.max_seq_len, p.causal)
    categorical = rasp.is_categorical(sink[nodes.EXPR])
    writes, reads, role = components(assembled, craft_model, graph, sink, p.max_seq_len)
    edges = ground_truth(writes, reads)
    vocab, out_tokens = tokenizer_vocab(assembled, sink, categorical, p.name)

    rng = random.Random(seed)
    tests, n_ok, max_err = [], 0, 0.0
    for inp in test_inputs(p, rng):
        expected = rasp.evaluate(prog, inp)
        decoded, units = run_tracr(assembled, sink, inp)
        got = decoded[1:]
        if categorical:
            ok = all(e is None or g == e for g, e in zip(got, expected))
        else:
            err = max(abs(g - e) for g, e in zip(got, expected) if e is not None)
            max_err, ok = max(max_err, err), err < 1e-3
        n_ok += ok
        tests.append({"input": inp, "expected": expected, "compiled": [None] + [x if categorical else float(x) for x in got],
                      "units": np.round(units.astype(np.float64), 6).tolist()})
    metrics = {"n_test": len(tests), "compiled_matches_rasp": n_ok, "max_numeric_error": max_err,
               "n_layers": assembled.model_config.num_layers, "n_heads": assembled.model_config.num_heads,
               "d_model": len(assembled.residual_labels), "n_ground_truth_edges": len(edges)}
    if n_ok != len(tests):
        raise SystemExit(f"{p.name}: the compiled model differs from the RASP evaluator on {len(tests) - n_ok} inputs")

    out = bundled / f"tracr-{p.name}"
    out.mkdir(parents=True, exist_ok=True)
    weights, config = hf_weights(assembled, vocab, out_tokens, sink)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tokenizer(vocab, out, p.max_seq_len + 1)
    meta = {"program": p.name, "description": p.description, "vocab": p.vocab, "max_seq_len": p.max_seq_len,
            "task_length": p.task_length or p.max_seq_len,
            "causal": p.causal, "output": "categorical" if categorical else "numerical", "output_tokens": out_tokens,
            "bos": BOS, "unique_tokens": p.unique_tokens, "residual_labels": assembled.residual_labels,
            "roles": role, "tests": tests}
    (out / "tracr.json").write_text(json.dumps(meta) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (specs / f"tracr_{p.name}.json").write_text(json.dumps(spec_json(p, edges, role, categorical), indent=2) + "\n")
    return metrics


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("programs", nargs="*", help=f"programs to compile (default: all of {[p.name for p in PROGRAMS]})")
    ap.add_argument("--bundled", type=Path, default=ROOT / "circuitgraph" / "bundled")
    ap.add_argument("--specs", type=Path, default=ROOT / "circuitgraph" / "specs")
    args = ap.parse_args(argv)
    for p in PROGRAMS:
        if args.programs and p.name not in args.programs:
            continue
        print(p.name, json.dumps(build(p, args.bundled, args.specs)))


if __name__ == "__main__":
    main()
