"""On a CUDA device: the engine's full and empty circuits against the plain HF model for each
architecture family, and one evaluation end to end.  Prints the largest differences.

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
            rand = (torch.rand(1, len(G.sources), len(G.destinations), device=device) < 0.3)
            got = e.patched_run(clean, abl, e.compile(torch.cat([full, ~full, rand])))
            ref_c, ref_k = hf(clean).logits, hf(corrupt).logits
            single = e.patched_run(clean, abl, e.compile(rand))
        d = max((got[0] - ref_c).abs().max().item(), (got[1] - ref_k).abs().max().item(), (got[2] - single[0]).abs().max().item())
        worst = max(worst, d)
        print(f"{family:16s} on {device}: max |engine - HF| = {d:.2e}")
    print("PASS" if worst < 1e-3 else "FAIL", f"(worst {worst:.2e})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
