"""Does SmolLM2-135M's IOI circuit depend on the wording?  Bootstrap resamples of rows against resamples of templates.

One command reproduces ``studies/results/smollm2_templates.{json,md}``::

    python studies/smollm2_templates.py [--model smollm2-135m-q4] [-n 64] [-B 20] [--fraction 0.01]

On ``-n`` IOI rows (``make-data ioi``, seed 0; each row names the template it was filled from), EAP scores
(``discover --method eap``) of ``-B`` resamples, each cut at the top ``--fraction`` of the edges by |score| and
pruned as MIB prunes, twice: resampling rows (``discover --bootstrap B``) and resampling whole templates
(``--by-template``).  Reported: each way's mean pairwise Jaccard of the resampled circuits, how many edges
are in at least 80% and in every resample, and the Jaccard of the two ways' stable (>= 80%) circuits.  If the
circuit depended on the wording, resampling templates would spread it more than resampling rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAME = "smollm2_templates"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-q4")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-B", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from circuitgraph import Evaluator, load_dataset, load_model
    from circuitgraph.data.tasks import make_data
    from circuitgraph.discovery.selection import SizeRule
    from circuitgraph.discovery.stability import bootstrap

    model = load_model(args.model)
    data = load_dataset(make_data("ioi", model.tokenizer, args.n, seed=0), model)
    ev = Evaluator(model, data, progress=False)
    templates = data.templates()
    n_top = round(args.fraction * model.graph.n_edges)
    rule = SizeRule("top_n", n_top, prune=True)
    out = {"model": args.model, "quantization": model.quantization, "n_rows": len(data), "B": args.B, "method": "eap",
           "top_n": n_top, "ranking": "absolute", "n_templates": len(set(templates)),
           "rows_per_template": sorted(templates.count(t) for t in set(templates))}
    stable = {}
    for way, groups in (("rows", None), ("templates", templates)):
        t = time.perf_counter()
        stab = bootstrap(ev, "eap", rule, args.B, groups=groups)
        freq = stab.edge_counts.double() / stab.n_resamples
        stable[way] = freq >= 0.8
        out[way] = {"seconds": round(time.perf_counter() - t, 1), "jaccard": stab.jaccard, "sizes": stab.sizes,
                    "edges_in_80pct": int(stable[way].sum()), "edges_in_all": int((freq >= 1).sum()),
                    "edges_ever": int((freq > 0).sum())}
        print(way, json.dumps(out[way]), flush=True)
    both, either = stable["rows"] & stable["templates"], stable["rows"] | stable["templates"]
    out["stable_jaccard"] = int(both.sum()) / max(1, int(either.sum()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(out, indent=1) + "\n")
    r, t = out["rows"], out["templates"]
    lines = [f"# IOI on {args.model}: resampling rows against resampling templates", "",
             f"{len(data)} `make-data ioi` rows (seed 0) from {out['n_templates']} templates "
             f"({min(out['rows_per_template'])}-{max(out['rows_per_template'])} rows each); EAP, each resample cut at the "
             f"top {n_top} edges by |score| ({args.fraction:.0%}), pruned as MIB prunes; B = {args.B}. "
             "Produced by `python studies/smollm2_templates.py`.", "",
             "| resampling | mean pairwise Jaccard | edges in >= 80% | in every resample | in any |", "|---|---|---|---|---|",
             f"| rows | {r['jaccard']:.3f} | {r['edges_in_80pct']} | {r['edges_in_all']} | {r['edges_ever']} |",
             f"| templates | {t['jaccard']:.3f} | {t['edges_in_80pct']} | {t['edges_in_all']} | {t['edges_ever']} |", "",
             f"Jaccard of the two stable (>= 80%) circuits: {out['stable_jaccard']:.3f}."]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
