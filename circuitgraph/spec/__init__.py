"""Step 3: circuit specs (our JSON and the EAP-IG / MIB JSON), resolved to edge sets of a graph."""

from circuitgraph.spec.circuit_spec import (CircuitSpec, Connection, Edge, Group, ResolvedCircuit, SpecError, from_mib,
                                            is_mib, json_schema, to_mib)

__all__ = ["CircuitSpec", "Connection", "Edge", "Group", "ResolvedCircuit", "SpecError", "from_mib", "is_mib",
           "json_schema", "to_mib"]
