"""On a CUDA device: the engine's full and empty circuits against the plain HF model for each
architecture family, single circuits (sparse and dense mixes) against the same circuits stacked with
others, and EAP against the same model on the CPU.  Prints the largest differences.

    python benchmarks/gpu_check.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import CONFIGS, randomize_norms  # noqa: E402

from circuitgraph.model.loading import CircuitModel  # noqa: E402


def main(device="cuda"):
    from transformers import AutoModelForCausalLM

    worst = 0.0
    for family, make in CONFIGS.items():
        torch.manual_seed(0)
        cfg = make()
        cfg._attn_implementation = "eager"
        hf = randomize_norms(AutoModelForCausalLM.from_config(cfg).eval()).to(device)
        model = CircuitModel(hf)
        e, G = model.engine, model.graph
        clean = torch.randint(3, cfg.vocab_size, (4, 9), device=device)
        corrupt = torch.randint(3, cfg.vocab_size, (4, 9), device=device)
        with torch.no_grad():
            _, outs = e.run(corrupt, record=True)
            abl = e.make_ablation(outs, "corrupted")
            full = torch.ones(1, len(G.sources), len(G.destinations), dtype=torch.bool, device=device)
            sparse, dense = (torch.rand(1, len(G.sources), len(G.destinations), device=device) < f for f in (0.05, 0.3))
            got = e.patched_run(clean, abl, e.compile(torch.cat([full, ~full, sparse, dense])))
            ref_c, ref_k = hf(clean).logits, hf(corrupt).logits
            alone = [e.patched_run(clean, abl, e.compile(m))[0] for m in (sparse, dense)]  # the one-circuit path
        d = max((got[0] - ref_c).abs().max().item(), (got[1] - ref_k).abs().max().item(),
                (got[2] - alone[0]).abs().max().item(), (got[3] - alone[1]).abs().max().item())
        worst = max(worst, d)
        print(f"{family:16s} on {device}: max |engine - HF| = {d:.2e}")
    for family in ("gpt2", "llama"):
        d = _eap_against_cpu(family, device)
        worst = max(worst, d)
        print(f"EAP {family:12s} on {device}: max |scores - CPU scores| / max |score| = {d:.2e}")
    print("PASS" if worst < 1e-3 else "FAIL", f"(worst {worst:.2e})")


def _eap_against_cpu(family: str, device: str) -> float:
    from transformers import AutoModelForCausalLM

    from circuitgraph.data.dataset import TaskData
    from circuitgraph.discovery import attribute
    from circuitgraph.evaluate.evaluator import Evaluator

    torch.manual_seed(1)
    cfg = CONFIGS[family]()
    cfg._attn_implementation = "eager"
    hf = randomize_norms(AutoModelForCausalLM.from_config(cfg).eval())
    g = torch.Generator().manual_seed(2)
    B, P, V = 6, 9, cfg.vocab_size
    clean, corrupt, ans = (torch.randint(3, V, shape, generator=g) for shape in ((B, P), (B, P), (B, 1)))
    data = TaskData(clean, corrupt, torch.full((B,), P), ans, (ans + 1) % V, {})
    scores = []
    for dev in ("cpu", device):
        model = CircuitModel(hf.to(dev))
        scores.append(attribute(Evaluator(model, data, progress=False), "eap", progress=False).scores)
    legal = model.graph.legal
    a, b = scores[0][legal], scores[1][legal]
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-12))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
