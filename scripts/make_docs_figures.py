"""Figures for docs/: a hand-written IOI-style spec, MIB's IOI circuit and toy-induction's verified spec.

    python scripts/make_docs_figures.py [OUT_DIR [TOP_N [MIB_JSON]]]
"""
import sys
from pathlib import Path
from circuitgraph.spec.circuit_spec import CircuitSpec
from circuitgraph.graph.computational_graph import Graph
from circuitgraph.render.figure import render

out = sys.argv[1] if len(sys.argv) > 1 else "docs"
ioi = (CircuitSpec(name="IOI circuit (Wang et al. 2022), simplified", model="gpt2", task="ioi")
       .group("previous token", ["a2.h2", "a4.h11"], positions=["S1+1"])
       .group("duplicate token", ["a0.h1", "a3.h0"], positions=["S2"])
       .group("induction", ["a5.h5", "a6.h9"], positions=["S2"])
       .group("S-inhibition", ["a7.h3", "a7.h9", "a8.h6", "a8.h10"], positions=["END"])
       .group("name movers", ["a9.h9", "a9.h6", "a10.h0"], positions=["END"])
       .group("negative name movers", ["a10.h7", "a11.h10"], positions=["END"])
       .connect("input", "previous token").connect("input", "duplicate token")
       .connect("previous token", "induction", "k")
       .connect("duplicate token", "S-inhibition", "v").connect("induction", "S-inhibition", "v")
       .connect("S-inhibition", "name movers", "q").connect("S-inhibition", "negative name movers", "q")
       .connect("input", "name movers", "v").connect("input", "negative name movers", "v")
       .connect("name movers", "logits").connect("negative name movers", "logits"))
ioi.edge_scores.update({"a10.h7->logits": -0.8, "a11.h10->logits": -0.5, "a9.h9->logits": 1.2,
                        "a9.h6->logits": 0.9, "a10.h0->logits": 0.6})
g = Graph(12, 12)
render(ioi, g, f"{out}/example_circuit.png", title="IOI circuit (Wang et al. 2022), simplified")

mib_path = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).resolve().parents[2] / "shared/data/mib/ioi-eap-ig.json"
mib = CircuitSpec.load(mib_path)
classes = {"name movers": ["a9.h9", "a9.h6", "a10.h0"], "negative name movers": ["a10.h7", "a11.h10"],
           "backup name movers": ["a10.h10", "a10.h6", "a10.h2", "a10.h1", "a11.h2", "a9.h7", "a9.h0", "a11.h9"],
           "S-inhibition": ["a7.h3", "a7.h9", "a8.h6", "a8.h10"], "induction": ["a5.h5", "a6.h9", "a5.h8", "a5.h9"],
           "duplicate token": ["a0.h1", "a0.h10", "a3.h0"], "previous token": ["a2.h2", "a4.h11"]}
in_circuit = set(mib.nodes)
for name, heads in classes.items():
    heads = [h for h in heads if h in in_circuit]
    if heads:
        mib.group(name, heads)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 120
thr = sorted((abs(mib.edge_scores[e.edge]) for e in mib.edges), reverse=True)[n - 1]
render(mib, None, f"{out}/ioi_mib.png", min_score=thr,
       title=f"MIB IOI circuit (GPT-2 small, EAP-IG): top {n} of {len(mib.edges)} edges by |score|")
render(mib, None, f"{out}/ioi_mib_collapsed.png", collapse_groups=True, min_score=thr,
       title=f"MIB IOI circuit, IOI head classes collapsed (top {n} edges)")

# toy-induction's shipped spec, each edge checked by removing it alone (dotted where it does nothing)
import warnings

from circuitgraph import Evaluator, load_model
from circuitgraph.data.dataset import Example, tokenize
from circuitgraph.data.tasks import make_data

model = load_model("toy-induction")
data = tokenize([Example(**r) for r in make_data("induction", model.tokenizer, 64, seed=0)], model.tokenizer)
spec = CircuitSpec.load("induction_toy")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ev = Evaluator(model, data, progress=False)
    score = ev.evaluate(spec)
    effects = ev.edge_effects(spec)
render(spec, model.graph, f"{out}/toy_induction_hypothesis.png", verified={k: v[0] for k, v in effects.items()},
       title=f"{spec.name}: faithfulness {score.faithfulness:.2f}")
