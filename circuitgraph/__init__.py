"""circuitgraph: test, discover and characterise transformer circuits with exact edge patching."""

from circuitgraph.data.dataset import TaskData, load_dataset, tokenize
from circuitgraph.graph.computational_graph import Graph
from circuitgraph.model.loading import CircuitModel, from_config, load_model
from circuitgraph.evaluate.evaluator import CircuitScore, Evaluator, evaluate
from circuitgraph.spec.circuit_spec import CircuitSpec

__version__ = "0.1.0"
__all__ = ["CircuitModel", "CircuitScore", "CircuitSpec", "Evaluator", "Graph", "TaskData", "evaluate", "from_config",
           "load_dataset", "load_model", "tokenize"]
