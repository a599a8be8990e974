"""The computational graph of a transformer: nodes, destination ports and edges.

Names follow MIB / EAP-IG: ``input``, ``a{L}.h{H}``, ``m{L}``, ``logits``; edges ``SRC->DST`` with
``<q>``/``<k>``/``<v>`` ports on head destinations.  Every destination reads a *prefix* of the
topologically ordered sources, which is what lets the patching engine work with dense masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import torch

from circuitgraph.graph.nodes import PORTS, NodeNameError, NodeRef, parse_edge


class GraphError(ValueError):
    """A node, port or edge name that does not exist in a model's graph."""


@dataclass(frozen=True)
class Graph:
    """Nodes and edges of one model shape (no weights needed)."""

    n_layers: int
    n_heads: int
    parallel_attn_mlp: bool = False
    d_model: int | None = None

    # ----- nodes -------------------------------------------------------------------------
    @cached_property
    def sources(self) -> list[str]:
        """Nodes that write to the residual stream, in topological order."""
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            out.append(f"m{layer}")
        return out

    @cached_property
    def nodes(self) -> list[str]:
        """Every node: the sources, then ``logits``."""
        return self.sources + ["logits"]

    @cached_property
    def source_index(self) -> dict[str, int]:
        """Source name -> its row in masks and score matrices."""
        return {n: i for i, n in enumerate(self.sources)}

    @cached_property
    def destinations(self) -> list[str]:
        """Inputs that read the residual stream: head ports, MLPs and the logits."""
        out = []
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}<{p}>" for h in range(self.n_heads) for p in PORTS]
            out.append(f"m{layer}")
        return out + ["logits"]

    @cached_property
    def destination_index(self) -> dict[str, int]:
        """Destination name (with its port) -> its column in masks and score matrices."""
        return {n: i for i, n in enumerate(self.destinations)}

    def head_source(self, layer: int, head: int) -> int:
        """Source index of head ``head`` of layer ``layer``."""
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_source(self, layer: int) -> int:
        """Source index of layer ``layer``'s MLP."""
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def head_dest(self, layer: int, head: int, port: str) -> int:
        """Destination index of one port (``q``, ``k`` or ``v``) of a head."""
        return layer * (3 * self.n_heads + 1) + 3 * head + PORTS.index(port)

    def mlp_dest(self, layer: int) -> int:
        """Destination index of layer ``layer``'s MLP input."""
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_dest(self) -> int:
        """Destination index of the logits (the last one)."""
        return len(self.destinations) - 1

    @cached_property
    def n_upstream(self) -> torch.Tensor:
        """For each destination, how many sources (a prefix of ``sources``) it reads."""
        counts = []
        for layer in range(self.n_layers):
            before = 1 + layer * (self.n_heads + 1)
            counts += [before] * (3 * self.n_heads)
            counts.append(before if self.parallel_attn_mlp else before + self.n_heads)
        counts.append(len(self.sources))
        return torch.tensor(counts)

    @cached_property
    def legal(self) -> torch.Tensor:
        """Bool ``[n_sources, n_destinations]``: which (source, destination) pairs are edges."""
        return torch.arange(len(self.sources))[:, None] < self.n_upstream[None, :]

    # ----- edges -------------------------------------------------------------------------
    @cached_property
    def edges(self) -> list[str]:
        """All edge names, in MIB's order (per destination block, source-major)."""
        out = []
        blocks = [list(range(b, b + 3 * self.n_heads)) for b in range(0, self.logits_dest, 3 * self.n_heads + 1)]
        ordered: list[list[int]] = []
        for layer, heads in enumerate(blocks):
            ordered.append(heads)
            ordered.append([self.mlp_dest(layer)])
        ordered.append([self.logits_dest])
        for block in ordered:
            for s in range(int(self.n_upstream[block[0]])):
                out += [f"{self.sources[s]}->{self.destinations[d]}" for d in block]
        return out

    @cached_property
    def edge_index(self) -> dict[str, tuple[int, int]]:
        """Edge name -> ``(source index, destination index)``."""
        idx = {}
        for name in self.edges:
            src, dst = name.split("->")
            idx[name] = (self.source_index[src], self.destination_index[dst])
        return idx

    @property
    def n_edges(self) -> int:
        """How many edges the graph has (MIB's count)."""
        return int(self.n_upstream.sum())

    # ----- name checks -------------------------------------------------------------------
    def check_node(self, name: str, where: str = "node") -> str:
        """Return ``name`` if it is a node of this graph, else raise a specific error."""
        ref = self.ref(name, where)
        if ref.port is not None:
            raise GraphError(f"{where} '{name}': a node name has no port (ports belong on edge destinations)")
        return name

    def ref(self, name: str, where: str = "node") -> NodeRef:
        """The typed reference of a node (or port) name, checked against this graph's shape."""
        try:
            ref = NodeRef.parse(name, where)
        except NodeNameError as e:
            raise GraphError(str(e)) from None
        if ref.layer is not None and ref.layer >= self.n_layers:
            raise GraphError(f"{where} '{name}': layer {ref.layer} out of range (model has {self.n_layers} layers, 0..{self.n_layers - 1})")
        if ref.head is not None and ref.head >= self.n_heads:
            raise GraphError(f"{where} '{name}': head {ref.head} out of range (model has {self.n_heads} heads per layer, 0..{self.n_heads - 1})")
        return ref

    def check_edge(self, name: str) -> tuple[int, int]:
        """Return (source index, destination index) of an edge name, or raise saying what is wrong."""
        if name in self.edge_index:
            return self.edge_index[name]
        try:
            src, dst = parse_edge(name)
        except NodeNameError as e:
            raise GraphError(str(e)) from None
        self.ref(str(src), where=f"edge '{name}': source")
        self.ref(str(dst), where=f"edge '{name}': destination")
        if src.kind == "logits":
            raise GraphError(f"edge '{name}': 'logits' cannot be a source")
        if dst.kind == "input":
            raise GraphError(f"edge '{name}': 'input' cannot be a destination")
        if dst.is_head and dst.port is None:
            raise GraphError(f"edge '{name}': a head destination needs a port, e.g. '{src}->{dst}<q>' (<q>, <k> or <v>)")
        raise GraphError(f"edge '{name}': '{src}' cannot feed '{dst}' — a head in layer L reads input, heads and MLPs of layers < L; "
                         f"m{{L}} reads heads of layers <= L{' (< L: parallel attention/MLP)' if self.parallel_attn_mlp else ''}; edges never go backwards")

    @staticmethod
    def node_of(destination: str) -> str:
        """The node a destination port belongs to: ``a1.h2<k>`` -> ``a1.h2``."""
        return NodeRef.parse(destination).name

    def to_networkx(self, circuit=None) -> nx.MultiDiGraph:
        """The graph, or one circuit of it, as a networkx MultiDiGraph; ports are edge keys.

        ``circuit``: a :class:`~circuitgraph.CircuitSpec` (its edges, with their ``positions`` and
        ``score``; nodes carry their ``group``), a resolved circuit, a list of edge names, or a
        bool ``[n_sources, n_destinations]`` mask.  Nodes carry ``layer``."""
        spec = circuit if hasattr(circuit, "edge_scores") and hasattr(circuit, "resolve") else None
        positions: dict[str, list[str] | None] = {}
        if spec is not None:
            circuit = circuit.resolve(self)
        if hasattr(circuit, "edges") and hasattr(circuit, "graph"):  # a ResolvedCircuit
            positions = {f"{self.sources[s]}->{self.destinations[d]}": pos for (s, d), pos in circuit.edges.items()}
            edges = list(positions)
        elif isinstance(circuit, torch.Tensor):
            if tuple(circuit.shape) != tuple(self.legal.shape):
                raise GraphError(f"an edge mask must have shape {list(self.legal.shape)}, got {list(circuit.shape)}")
            edges = [f"{self.sources[s]}->{self.destinations[d]}" for s, d in torch.nonzero(circuit.bool() & self.legal).tolist()]
        elif circuit is None:
            edges = self.edges
        elif isinstance(circuit, str):
            raise GraphError("to_networkx takes a list of edge names, not one string")
        else:
            edges = list(circuit)
            for name in edges:
                self.check_edge(name)
        scores = {}
        if spec is not None:
            scores = {k: v for k, v in spec.edge_scores.items() if v is not None}
            scores.update({e.edge: e.score for e in spec.edges if e.score is not None})
        g = nx.MultiDiGraph()
        for n in self.nodes:
            attrs = {"layer": _layer_of(n, self.n_layers)}
            if spec is not None and (group := spec.group_of(n)) is not None:
                attrs["group"] = group
            g.add_node(n, **attrs)
        for name in edges:
            src, dst = parse_edge(name)
            attrs = {"port": dst.port, "name": name}
            if name in positions:
                attrs["positions"] = positions[name]
            if name in scores:
                attrs["score"] = scores[name]
            g.add_edge(src.name, dst.name, key=dst.port or "", **attrs)
        if circuit is not None:  # a circuit's graph holds the nodes its edges touch
            g.remove_nodes_from([n for n in list(g) if g.degree(n) == 0])
        return g

    @classmethod
    def from_hf_config(cls, config) -> "Graph":
        """Graph of a HuggingFace config (GPT-2, GPT-NeoX/Pythia, Llama/Qwen/Mistral)."""
        from circuitgraph.model.families import describe_config

        arch = describe_config(config)
        return cls(arch.n_layers, arch.n_heads, arch.parallel_attn_mlp, arch.d_model)


def _layer_of(node: str, n_layers: int) -> float:
    return NodeRef.parse(node).rank(n_layers)
