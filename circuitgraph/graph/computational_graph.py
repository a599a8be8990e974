"""The computational graph of a transformer: nodes, destination ports and edges.

Names follow MIB / EAP-IG: ``input``, ``a{L}.h{H}``, ``m{L}``, ``logits``; edges ``SRC->DST`` with
``<q>``/``<k>``/``<v>`` ports on head destinations.  Every destination reads a *prefix* of the
topologically ordered sources, which is what lets the patching engine work with dense masks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import torch

PORTS = ("q", "k", "v")
_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")
_DST = re.compile(r"^([^<]+)<([a-z]*)>$")


class GraphError(ValueError):
    """A node, port or edge name that does not exist in a model's graph."""


@dataclass(frozen=True)
class Graph:
    """Nodes and edges of one model shape (no weights needed)."""

    n_layers: int
    n_heads: int
    parallel_attn_mlp: bool = False
    d_model: int | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

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
        return self.sources + ["logits"]

    @cached_property
    def source_index(self) -> dict[str, int]:
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
        return {n: i for i, n in enumerate(self.destinations)}

    def head_source(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_source(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def head_dest(self, layer: int, head: int, port: str) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * head + PORTS.index(port)

    def mlp_dest(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_dest(self) -> int:
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
        idx = {}
        for name in self.edges:
            src, dst = name.split("->")
            idx[name] = (self.source_index[src], self.destination_index[dst])
        return idx

    @property
    def n_edges(self) -> int:
        return int(self.n_upstream.sum())

    # ----- name checks -------------------------------------------------------------------
    def check_node(self, name: str, where: str = "node") -> str:
        """Return ``name`` if it is a node of this graph, else raise a specific error."""
        if name in ("input", "logits"):
            return name
        if m := _HEAD.match(name):
            layer, head = int(m[1]), int(m[2])
            if layer >= self.n_layers:
                raise GraphError(f"{where} '{name}': layer {layer} out of range (model has {self.n_layers} layers, 0..{self.n_layers - 1})")
            if head >= self.n_heads:
                raise GraphError(f"{where} '{name}': head {head} out of range (model has {self.n_heads} heads per layer, 0..{self.n_heads - 1})")
            return name
        if m := _MLP.match(name):
            layer = int(m[1])
            if layer >= self.n_layers:
                raise GraphError(f"{where} '{name}': layer {layer} out of range (model has {self.n_layers} layers, 0..{self.n_layers - 1})")
            return name
        raise GraphError(f"{where} '{name}': unknown node; expected 'input', 'logits', 'a<layer>.h<head>' or 'm<layer>'")

    def check_edge(self, name: str) -> tuple[int, int]:
        """Return (source index, destination index) of an edge name, or raise saying what is wrong."""
        if name in self.edge_index:
            return self.edge_index[name]
        if name.count("->") != 1:
            raise GraphError(f"edge '{name}': expected 'SRC->DST' (e.g. 'a0.h1->a1.h2<k>')")
        src, dst = name.split("->")
        src = src.strip()
        self.check_node(src, where=f"edge '{name}': source")
        if src == "logits":
            raise GraphError(f"edge '{name}': 'logits' cannot be a source")
        port = None
        if m := _DST.match(dst):
            dst, port = m[1], m[2]
            if port not in PORTS:
                raise GraphError(f"edge '{name}': unknown port <{port}>; expected <q>, <k> or <v>")
        elif "<" in dst:
            raise GraphError(f"edge '{name}': malformed port on '{dst}'; expected e.g. 'a1.h2<q>'")
        self.check_node(dst, where=f"edge '{name}': destination")
        if dst == "input":
            raise GraphError(f"edge '{name}': 'input' cannot be a destination")
        if _HEAD.match(dst) and port is None:
            raise GraphError(f"edge '{name}': a head destination needs a port, e.g. '{src}->{dst}<q>' (<q>, <k> or <v>)")
        if port is not None and not _HEAD.match(dst):
            raise GraphError(f"edge '{name}': port <{port}> given on '{dst}', but only attention heads have q/k/v ports")
        raise GraphError(f"edge '{name}': '{src}' cannot feed '{dst}' — a head in layer L reads input, heads and MLPs of layers < L; "
                         f"m{{L}} reads heads of layers <= L{' (< L: parallel attention/MLP)' if self.parallel_attn_mlp else ''}; edges never go backwards")

    @staticmethod
    def node_of(destination: str) -> str:
        """The node a destination port belongs to: ``a1.h2<k>`` -> ``a1.h2``."""
        return destination.split("<")[0]

    def to_networkx(self, edges: list[str] | None = None) -> nx.MultiDiGraph:
        """The graph (or a subset of its edges) as a networkx MultiDiGraph; ports are edge keys."""
        g = nx.MultiDiGraph()
        for n in self.nodes:
            g.add_node(n, layer=_layer_of(n, self.n_layers))
        for name in edges if edges is not None else self.edges:
            src, dst = name.split("->")
            port = dst[dst.index("<") + 1:-1] if "<" in dst else None
            g.add_edge(src, self.node_of(dst), key=port or "", port=port, name=name)
        return g

    @classmethod
    def from_hf_config(cls, config) -> "Graph":
        """Graph of a HuggingFace config (GPT-2, GPT-NeoX/Pythia, Llama/Qwen/Mistral)."""
        from circuitgraph.model.families import describe_config

        arch = describe_config(config)
        return cls(arch.n_layers, arch.n_heads, arch.parallel_attn_mlp, arch.d_model)


def _layer_of(node: str, n_layers: int) -> float:
    if node == "input":
        return -1
    if node == "logits":
        return n_layers
    if m := _HEAD.match(node):
        return int(m[1])
    return int(_MLP.match(node)[1]) + 0.5
