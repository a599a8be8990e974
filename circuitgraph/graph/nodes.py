"""Typed node and edge references: the one place node names are parsed.

``input``, ``a{L}.h{H}`` (optionally with a ``<q>``/``<k>``/``<v>`` port when it is an edge's
destination), ``m{L}``, ``logits``; edges ``SRC->DST``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PORTS = ("q", "k", "v")
_NODE = re.compile(r"^(?:(input|logits)|a(\d+)\.h(\d+)|m(\d+))(?:<([^>]*)>)?$")


class NodeNameError(ValueError):
    """A string that is not a node name of any graph."""


@dataclass(frozen=True)
class NodeRef:
    """A parsed node or destination name: kind, layer, head and port (every name is parsed here, once)."""

    kind: str  # "input", "head", "mlp" or "logits"
    layer: int | None = None
    head: int | None = None
    port: str | None = None  # "q", "k" or "v" on a head destination

    @classmethod
    def parse(cls, name: str, where: str = "node") -> "NodeRef":
        """Parse ``input``, ``logits``, ``a{L}.h{H}`` (with an optional ``<q|k|v>``
        port) or ``m{L}``; a :class:`NodeNameError` says what is wrong."""
        m = _NODE.match(name.strip()) if isinstance(name, str) else None
        if m is None:
            if isinstance(name, str) and "<" in name and not name.rstrip().endswith(">"):
                raise NodeNameError(f"{where} '{name}': malformed port; expected e.g. 'a1.h2<q>'")
            raise NodeNameError(f"{where} '{name}': unknown node; expected 'input', 'logits', 'a<layer>.h<head>' or 'm<layer>'")
        special, layer, head, mlp, port = m.groups()
        if port is not None and port not in PORTS:
            raise NodeNameError(f"{where} '{name}': unknown port <{port}>; expected <q>, <k> or <v>")
        if special:
            ref = cls(special)
        elif layer is not None:
            ref = cls("head", int(layer), int(head))
        else:
            ref = cls("mlp", int(mlp))
        if port is not None:
            if ref.kind != "head":
                raise NodeNameError(f"{where} '{name}': port <{port}> given on '{ref.name}', but only attention heads have q/k/v ports")
            ref = cls("head", ref.layer, ref.head, port)
        return ref

    @property
    def is_head(self) -> bool:
        """Whether this is an attention head."""
        return self.kind == "head"

    @property
    def is_mlp(self) -> bool:
        """Whether this is an MLP."""
        return self.kind == "mlp"

    @property
    def name(self) -> str:
        """The node's name, without a port."""
        if self.kind == "head":
            return f"a{self.layer}.h{self.head}"
        if self.kind == "mlp":
            return f"m{self.layer}"
        return self.kind

    @property
    def node(self) -> "NodeRef":
        """The same node without a port."""
        return NodeRef(self.kind, self.layer, self.head)

    def rank(self, n_layers: int) -> float:
        """Position in the forward order: input -1, heads of layer L at L, m{L} at L + 0.5, logits n_layers."""
        return {"input": -1, "logits": n_layers}.get(self.kind, (self.layer or 0) + (0.5 if self.kind == "mlp" else 0))

    def block_layer(self, n_layers: int) -> int:
        """The layer whose computation this node (or destination) belongs to; logits: ``n_layers``."""
        return n_layers if self.kind == "logits" else (-1 if self.kind == "input" else self.layer)

    def __str__(self) -> str:
        return self.name + (f"<{self.port}>" if self.port else "")


def parse_edge(name: str) -> tuple[NodeRef, NodeRef]:
    """``'SRC->DST'`` into its two references (syntax only; a graph checks that the edge exists)."""
    if not isinstance(name, str) or name.count("->") != 1:
        raise NodeNameError(f"edge '{name}': expected 'SRC->DST' (e.g. 'a0.h1->a1.h2<k>')")
    src, dst = name.split("->")
    s = NodeRef.parse(src, where=f"edge '{name}': source")
    if s.port is not None:
        raise NodeNameError(f"edge '{name}': a source has no port; ports belong on the destination")
    return s, NodeRef.parse(dst, where=f"edge '{name}': destination")
