"""Step 1 of the pipeline: load a causal LM and translate it into the engine's per-head form."""

from circuitgraph.model.weights import UnsupportedArchitecture
from circuitgraph.model.loading import CircuitModel, ModelLoadError, bundled_models, from_config, load_model, resolve

__all__ = ["CircuitModel", "ModelLoadError", "UnsupportedArchitecture", "bundled_models", "from_config", "load_model", "resolve"]
