"""EAP, EAP-IG, a patched run and the default size selection on a real trained model (SmolLM2-135M),
each next to the HF forward and forward + backward of the same rows.

IOI rows from ``make-data ioi`` (seed 0), one batch, CPU, ``--threads`` threads.  Every stage runs
``--repeats`` times, the stages interleaved round by round so that a busy machine slows all of them
alike; the table gives medians and each median as a multiple of the HF forward's.  Circuits: the
shipped ``ioi_smollm2`` spec (positions and ports) and the top 10% / 25% of the EAP scores by |score|.
Writes benchmarks/results/bench_real_model.{json,md}.

    python benchmarks/bench_real_model.py [--model smollm2-135m-q4] [-n 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-q4")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-selection", action="store_true", help="skip the default size selection (the slowest stage)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from circuitgraph import CircuitSpec, Evaluator, load_dataset, load_model
    from circuitgraph.data.tasks import make_data
    from circuitgraph.discovery import discover, smallest_faithful
    from circuitgraph.discovery.curves import ranked_top_n

    model = load_model(args.model)
    data = load_dataset(make_data("ioi", model.tokenizer, args.n, seed=0), model)
    ev = Evaluator(model, data, batch_size=args.n, progress=False)
    assert ev.n_batches == 1, "one batch: every stage sees the same rows at once"
    G, hf = model.graph, model.hf
    clean, last = data.clean, data.last
    rows = torch.arange(len(data))
    answers, wrongs = data.answers[:, 0], data.wrongs[:, 0]

    def hf_forward():
        with torch.no_grad():
            hf(clean)

    def hf_backward():
        hf.zero_grad(set_to_none=True)
        logits = hf(clean).logits[rows, last]
        (logits[rows, answers] - logits[rows, wrongs]).mean().backward()

    def engine_forward():
        with torch.no_grad():
            model.engine.run(clean, logit_positions=last)

    eap = discover(ev, "eap", progress=False)
    eap_ig = discover(ev, "eap-ig", progress=False)
    ioi = ev.resolve(CircuitSpec.load("ioi_smollm2"))
    masks = {f"top {p:.0%} of EAP (|score|)": ranked_top_n(eap, round(p * G.n_edges), "absolute") for p in (0.10, 0.25)}

    def patched(mask):
        return lambda: ev.mask_values(mask[None])

    stages = {"HF forward": hf_forward, "HF forward + backward": hf_backward, "engine forward (clean)": engine_forward,
              f"patched run: ioi_smollm2 ({len(ioi)} edges, positional)": lambda: ev.metric_values([ioi]),
              **{f"patched run: {k} ({int(m.sum())} edges)": patched(m) for k, m in masks.items()},
              "EAP": lambda: discover(ev, "eap", progress=False),
              "EAP-IG (5 steps, right)": lambda: discover(ev, "eap-ig", progress=False),
              "EAP-IG (5 steps, left)": lambda: discover(ev, "eap-ig", ig_points="left", progress=False)}
    if not args.no_selection:
        stages["default size selection (EAP scores)"] = lambda: smallest_faithful(ev, eap)
        stages["default size selection (EAP-IG scores)"] = lambda: smallest_faithful(ev, eap_ig)
    times: dict[str, list[float]] = {k: [] for k in stages}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for name, fn in stages.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            print(f"round {r + 1}/{args.repeats}  {name}: {times[name][-1]:.2f} s", flush=True)
        load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["HF forward"]
    out = {"model": args.model, "quantization": model.quantization, "n_rows": len(data), "tokens_per_row": clean.shape[1],
           "n_edges": G.n_edges, "threads": args.threads, "repeats": args.repeats, "date": date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
           "load_average_1min": load, "seconds": times, "median_seconds": med,
           "x_hf_forward": {k: v / base for k, v in med.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_real_model.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# Real model: {args.model} ({model.quantization})", "",
             f"{len(data)} IOI rows x {clean.shape[1]} tokens, one batch; {G.n_edges:,} edges; CPU, {args.threads} threads, "
             f"{out['machine']}, torch {torch.__version__}, {out['date']}. Medians of {args.repeats} interleaved rounds; "
             f"1-minute load average {min(load):.1f}-{max(load):.1f}. Produced by `python benchmarks/bench_real_model.py`.", "",
             "| stage | median (s) | x HF forward |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / base:.1f} |" for k, v in med.items()]
    (RESULTS / "bench_real_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
