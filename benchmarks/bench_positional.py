"""What by-position attribution costs: EAP and EAP-IG (5 steps) with and without ``by_position`` on a
random-init GPT-2-small-shaped model (16 examples x 16 tokens, five named positions a row, as IOI
names), and the plain path against the attribution code of an earlier commit (``--before``), all
timed in one process (best of ``--repeats``, interleaved; on CPU the process's CPU time, which other
processes on a shared machine disturb less than wall time, is reported beside it).  Peak memory above the set-up's is
measured per mode in a fresh process (CPU: resident set sampled every millisecond; CUDA: the
allocator's peak).  Writes benchmarks/results/bench_positional.json and .md.

    python benchmarks/bench_positional.py [--device cpu|cuda] [--before REV] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "ff61152"  # the last commit without by-position scores
MODES = {"eap": ("eap", False), "eap by position": ("eap", True), "eap-ig": ("eap-ig", False),
         "eap-ig by position": ("eap-ig", True)}


def setup(device: str, B: int = 16, P: int = 16):
    from transformers import GPT2Config

    from circuitgraph.data.dataset import TaskData
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.model.loading import CircuitModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = GPT2Config()
    cfg._attn_implementation = "eager"
    model = CircuitModel(AutoModelForCausalLM.from_config(cfg).eval().to(device), name="random-gpt2")
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, 50257, (B, P), generator=g), torch.randint(0, 50257, (B, P), generator=g)
    io = torch.randint(1, 3, (B,), generator=g)  # IOI-like spans, moving a little from row to row
    positions = {"IO": io, "S1": io + 2, "S1+1": io + 3, "S2": torch.randint(8, 12, (B,), generator=g), "END": torch.full((B,), P - 1)}
    data = TaskData(clean, corrupt, torch.full((B,), P), torch.randint(0, 50257, (B, 1), generator=g),
                    torch.randint(0, 50257, (B, 1), generator=g), positions)
    ev = Evaluator(model, data, batch_size=B, progress=False)
    ev.batch(0)  # the clean and corrupted runs, cached: not part of what is measured
    return ev


def old_attribute(rev: str):
    """``attribute`` as commit ``rev`` had it."""
    text = subprocess.run(["git", "show", f"{rev}:circuitgraph/discovery/eap.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "eap_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("eap_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.attribute


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def times(device: str, before: str, repeats: int) -> dict:
    from circuitgraph.discovery import attribute

    ev = setup(device)
    old = old_attribute(before)
    runs = {name: (lambda m=m, p=p: attribute(ev, m, progress=False, by_position=p)) for name, (m, p) in MODES.items()}
    runs.update({f"{m} before": (lambda m=m: old(ev, m, progress=False)) for m in ("eap", "eap-ig")})
    wall, cpu = {name: float("inf") for name in runs}, {name: float("inf") for name in runs}
    for name, fn in runs.items():  # warm up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[name], cpu[name] = min(wall[name], time.perf_counter() - t), min(cpu[name], time.process_time() - c)
    return wall, cpu


def peak(device: str, mode: str) -> float:
    """MiB the attribution adds at its peak to what the set-up holds."""
    from circuitgraph.discovery import attribute

    ev = setup(device)
    method, by_position = MODES[mode]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        attribute(ev, method, progress=False, by_position=by_position)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    page = 4096

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, top, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            top[0] = max(top[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    attribute(ev, method, progress=False, by_position=by_position)
    done.set()
    t.join()
    return (max(top[0], rss()) - base) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--before", default=BEFORE)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak", help=argparse.SUPPRESS)  # one mode's peak, in a fresh process
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.peak:
        print(peak(args.device, args.peak))
        return
    wall, cpu = times(args.device, args.before, args.repeats)
    t = cpu if args.device == "cpu" else wall  # what the ratios use
    mem = {mode: float(subprocess.run([sys.executable, __file__, "--device", args.device, "--peak", mode], check=True,
                                      capture_output=True, text=True).stdout.split()[-1]) for mode in MODES}
    out = {"device": args.device, "model": "gpt2-small shape (random init)", "examples": 16, "tokens": 16,
           "named_positions": 5, "before": args.before, "wall_s": wall, "cpu_s": cpu,
           "ratios_from": "cpu_s" if args.device == "cpu" else "wall_s", "peak_mib": mem,
           "eap_ig_by_position_time_ratio": t["eap-ig by position"] / t["eap-ig"],
           "eap_ig_by_position_memory_ratio": mem["eap-ig by position"] / mem["eap-ig"],
           "eap_by_position_time_ratio": t["eap by position"] / t["eap"],
           "eap_by_position_memory_ratio": mem["eap by position"] / mem["eap"],
           "plain_eap_vs_before": t["eap"] / t["eap before"], "plain_eap_ig_vs_before": t["eap-ig"] / t["eap-ig before"]}
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else "_cuda"
    (dest / f"bench_positional{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"GPT-2-small shape, 16 x 16 tokens, 5 named positions + rest, {args.device}, best of {args.repeats}",
             "", "| | wall s | CPU s | peak MiB above set-up |", "|---|---|---|---|"]
    for name in t:
        lines.append(f"| {name} | {wall[name]:.3f} | {cpu[name]:.3f} | {mem[name]:.0f} |" if name in mem else
                     f"| {name} | {wall[name]:.3f} | {cpu[name]:.3f} | |")
    lines += ["", f"ratios from {out['ratios_from']}:", f"by position / plain: EAP {out['eap_by_position_time_ratio']:.2f}x time, {out['eap_by_position_memory_ratio']:.2f}x memory; "
              f"EAP-IG {out['eap_ig_by_position_time_ratio']:.2f}x time, {out['eap_ig_by_position_memory_ratio']:.2f}x memory",
              f"plain now / before ({args.before}): EAP {out['plain_eap_vs_before']:.2f}x, EAP-IG {out['plain_eap_ig_vs_before']:.2f}x"]
    (dest / f"bench_positional{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
