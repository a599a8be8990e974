"""Each discovery method on toy-induction: AUC against specs/induction_toy.json, CPR/CMD of its
faithfulness curve, wall time. Writes benchmarks/results/toy_induction_methods.json.

    python benchmarks/toy_induction_methods.py
"""
import torch, warnings, json
warnings.simplefilter("ignore"); torch.set_num_threads(2)
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_toy_circuit import SPEC
from circuitgraph.data.dataset import Example, tokenize
from circuitgraph.discovery import discover, roc_auc, faithfulness_curve
from circuitgraph.model.loading import load_model
from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.spec.circuit_spec import CircuitSpec
from circuitgraph.data.tasks import make_data
model = load_model("toy-induction")
data = tokenize([Example(**r) for r in make_data("induction", model.tokenizer, 48, seed=7)], model.tokenizer)
ref = CircuitSpec.load(SPEC).resolve(model.graph).edge_mask()
rows = []
for method in ["eap", "eap-ig", "eap-ig-activations", "exact", "acdc"]:
    ev = Evaluator(model, data, metric="kl" if method == "acdc" else "logit_diff", progress=False)
    sc = discover(ev, method, steps=5, tau=0.05, progress=False)
    auc = roc_auc(sc, ref)[0]
    cur = faithfulness_curve(Evaluator(model, data, progress=False), sc)
    rows.append({"method": method, "auc": round(auc, 3), "cpr": round(cur.cpr, 3), "cmd": round(cur.cmd, 3), "seconds": round(sc.meta["seconds"], 2)})
    print(json.dumps(rows[-1]))
out = Path(__file__).resolve().parent / "results" / "toy_induction_methods.json"
out.write_text(json.dumps(rows, indent=2) + "\n")
