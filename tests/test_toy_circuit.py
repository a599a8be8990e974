"""The bundled toy-induction model's known circuit: the shipped spec is faithful, and every
discovery method finds its key edges."""

from pathlib import Path

import pytest

from circuitgraph.data.dataset import Example, tokenize
from circuitgraph.discovery import discover, roc_auc
from circuitgraph.model.loading import load_model
from circuitgraph.evaluate.evaluator import Evaluator
from circuitgraph.spec.circuit_spec import CircuitSpec
from circuitgraph.data.tasks import make_data

SPEC = Path(__file__).resolve().parents[1] / "specs" / "induction_toy.json"


@pytest.fixture(scope="module")
def toy():
    model = load_model("toy-induction")
    data = tokenize([Example(**r) for r in make_data("induction", model.tokenizer, 48, seed=7)], model.tokenizer)
    return model, data


def test_induction_spec_is_faithful_and_its_complement_is_not(toy):
    model, data = toy
    score = Evaluator(model, data, progress=False).evaluate(CircuitSpec.load(SPEC))
    assert score.faithfulness >= 0.9
    assert 1 - score.necessity <= 0.2  # the complement's faithfulness
    assert score.clean_metric - score.corrupted_metric > 5  # the model really does induction


@pytest.mark.parametrize("method", ["eap", "eap-ig", "eap-ig-activations", "exact", "acdc"])
def test_every_method_finds_the_known_edges(toy, method):
    model, data = toy
    metric = "kl" if method == "acdc" else "logit_diff"
    ev = Evaluator(model, data, metric=metric, progress=False)
    scores = discover(ev, method, steps=3, tau=0.05, progress=False)
    chosen = scores.in_circuit if method == "acdc" else scores.top_n(20)
    names = {e for e in model.graph.edges if chosen[model.graph.edge_index[e]]}
    assert names & {"a0.h0->a1.h1<k>", "a0.h1->a1.h1<k>"}, names  # previous-token head -> induction head key
    assert "a1.h1->logits" in names
    reference = CircuitSpec.load(SPEC).resolve(model.graph)
    auc, _, _ = roc_auc(scores, reference.edge_mask())
    assert auc > 0.7  # far above chance (0.5) at ranking the known circuit's 33 of 110 edges

