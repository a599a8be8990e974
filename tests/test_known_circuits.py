"""The known-answer benchmark's numbers, recomputed on its smallest model (tracr-shift2)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_benchmark_auc_recomputed_on_smallest_model():
    import known_circuits as kc

    case = next(c for c in kc.CASES if c.model == "tracr-shift2")
    methods = ["acdc", "eap", "eap-ig", "exact"]
    rows = kc.run_case(case, methods)
    saved = {r["method"]: r for r in json.loads((ROOT / "benchmarks" / "results" / "known_circuits.json").read_text())
             if r["model"] == case.model}
    for r in rows:
        assert r["auc"] >= 0.95, r
        assert r["auc"] == pytest.approx(saved[r["method"]]["auc"], abs=1e-6)
        assert r["edges_selected"] == saved[r["method"]]["edges_selected"]


def test_minimal_induction_reference_is_a_faithful_subset():
    """The minimal toy-induction reference drops only edges that do not matter under its corruption."""
    from circuitgraph.data.dataset import Example, tokenize
    from circuitgraph.data.tasks import make_data
    from circuitgraph.evaluate import Evaluator
    from circuitgraph.model import load_model
    from circuitgraph.spec import CircuitSpec

    specs = ROOT / "circuitgraph" / "specs"
    model = load_model("toy-induction")
    full = CircuitSpec.load(specs / "induction_toy.json")
    minimal = CircuitSpec.load(specs / "induction_toy_minimal.json")
    f, m = full.resolve(model.graph), minimal.resolve(model.graph)
    assert all(f.edges.get(k, "absent") == v for k, v in m.edges.items()) and len(m) < len(f)
    data = tokenize([Example.model_validate(r) for r in make_data("induction", model.tokenizer, 32, seed=5)], model.tokenizer)
    ev = Evaluator(model, data, progress=False)
    assert ev.evaluate(minimal).faithfulness == pytest.approx(ev.evaluate(full).faithfulness, abs=0.03)
