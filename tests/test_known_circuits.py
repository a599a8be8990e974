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
