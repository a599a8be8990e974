"""Step 5: the patching engine, one forward pass per circuit."""

from circuitgraph.engine.patching import Ablation, PatchEngine, Plan, PrefixState

__all__ = ["Ablation", "PatchEngine", "Plan", "PrefixState"]
