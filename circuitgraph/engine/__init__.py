"""Step 5: the patching engine, one forward pass per circuit, on one block kernel."""

from circuitgraph.engine.ablation import Ablation, PrefixState
from circuitgraph.engine.engine import PatchEngine
from circuitgraph.engine.kernel import Kernel
from circuitgraph.engine.plan import Plan

__all__ = ["Ablation", "Kernel", "PatchEngine", "Plan", "PrefixState"]
