"""circuitgraph: test, discover and characterise transformer circuits with exact edge patching."""

from .data import TaskData, load_dataset, tokenize
from .graph import Graph
from .model import CircuitModel, from_config, load_model
from .scores import CircuitScore, Evaluator, evaluate
from .spec import CircuitSpec

__version__ = "0.1.0"
__all__ = ["CircuitModel", "CircuitScore", "CircuitSpec", "Evaluator", "Graph", "TaskData", "evaluate", "from_config",
           "load_dataset", "load_model", "tokenize"]
