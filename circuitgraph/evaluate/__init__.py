"""Step 6: scores of circuits (faithfulness, necessity, edge and node effects) and path patching."""

from circuitgraph.evaluate.evaluator import CircuitScore, Evaluator, evaluate
from circuitgraph.evaluate.metrics import get_metric

__all__ = ["CircuitScore", "Evaluator", "evaluate", "get_metric"]
