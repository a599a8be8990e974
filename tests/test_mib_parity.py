"""faithfulness_curve against MIB's own evaluate_area_under_curve on a tiny random GPT-2 (benchmarks/bench_mib_parity.py).

Runs where the peers' environment (``PEERS_PYTHON`` or ``benchmarks/.peers-venv``, see bench_peers.py) and a
copy of cisnlp/MIB-circuit-track with its EAP-IG folder (``MIB_CIRCUIT_TRACK`` or /tmp/MIB-circuit-track) are
present; skipped, with the reason, otherwise.  About 30 s of CPU time (a third of it importing
TransformerLens in the peers' process).
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_mib_parity as B  # noqa: E402
from bench_peers import _peers_python  # noqa: E402

PEERS = _peers_python(None)
MIB = B.mib_path()

pytestmark = [
    pytest.mark.skipif(PEERS is None, reason="no peers environment (PEERS_PYTHON or benchmarks/.peers-venv; "
                                             "recipe in benchmarks/bench_peers.py)"),
    pytest.mark.skipif(MIB is None, reason=f"no MIB circuit-track source (MIB_CIRCUIT_TRACK or {B.DEFAULT_MIB})"),
    pytest.mark.skipif(MIB is not None and not (MIB / "EAP-IG" / "src" / "eap" / "graph.py").exists(),
                       reason="the MIB circuit-track copy has no EAP-IG folder (clone it with --recursive)"),
]


def test_faithfulness_curve_matches_mib(tmp_path):
    B.make_case(tmp_path, "tiny", batch=8, seq=8, seed=3)
    info = B.make_scores(tmp_path, "random", seed=3)
    assert info["ties"] == {"signed": 0, "absolute": 0}
    ours = B.run_ours(tmp_path)
    mib = B.run_mib(tmp_path, PEERS, MIB, timeout=300)
    c = B.compare(ours, mib)
    for k, row in c["rankings"].items():
        assert row["max_abs_diff"] <= B.FAITH_TOL, (k, row["points"])
        assert row["counted_equal"], (k, row["points"])
        assert row["evaluated_equal"], (k, row["points"])
    assert c["checks"]["n_edges_total_equal"]
    assert abs(c["cpr"]["ours"] - c["cpr"]["mib"]) <= B.AREA_TOL
    assert abs(c["cmd"]["ours"] - c["cmd"]["mib"]) <= B.AREA_TOL
    assert abs(c["clean"]["ours"] - c["clean"]["mib"]) <= 1e-4
    # MIB given our sign ranks from the other end: a different curve, which our negated scores reproduce
    assert c["max_abs_diff_signed_vs_mib_unflipped"] > 0.1
