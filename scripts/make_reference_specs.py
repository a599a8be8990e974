"""Write the reference circuit specs for GPT-2 small in specs/ (and validate them against its graph).

    python scripts/make_reference_specs.py
"""

from pathlib import Path

from transformers import GPT2Config

from circuitgraph.graph.computational_graph import Graph
from circuitgraph.spec.circuit_spec import CircuitSpec

SPECS = Path(__file__).resolve().parents[1] / "circuitgraph" / "specs"


def ioi() -> CircuitSpec:
    """Wang et al. (2022), Figure 2 and Section 3: 26 heads in seven classes."""
    s = CircuitSpec(
        name="IOI circuit", model="gpt2", task="ioi",
        source="Wang, Variengien, Conmy, Shlegeris, Steinhardt (2022). Interpretability in the Wild: a Circuit "
               "for Indirect Object Identification in GPT-2 small. arXiv:2211.00593",
        description="Name movers copy the indirect object's name at END; S-inhibition heads move the "
                    "duplicated-subject signal (from induction and duplicate-token heads at S2, helped by "
                    "previous-token heads at S1+1) into the name movers' queries. MLPs are not part of the "
                    "published circuit, so under edge patching they are ablated.")
    s.group("name movers", ["a9.h9", "a10.h0", "a9.h6"], positions=["END"])
    s.group("backup name movers", ["a10.h10", "a10.h6", "a10.h2", "a10.h1", "a11.h2", "a9.h7", "a9.h0", "a11.h9"], positions=["END"])
    s.group("negative name movers", ["a10.h7", "a11.h10"], positions=["END"])
    s.group("S-inhibition", ["a7.h3", "a7.h9", "a8.h6", "a8.h10"], positions=["END"])
    s.group("induction", ["a5.h5", "a5.h8", "a5.h9", "a6.h9"], positions=["S2"])
    s.group("duplicate token", ["a0.h1", "a0.h10", "a3.h0"], positions=["S2"])
    s.group("previous token", ["a2.h2", "a4.h11"], positions=["S1+1"])
    movers = ["name movers", "backup name movers", "negative name movers"]
    for g in movers:
        s.connect("S-inhibition", g, "q")          # the S-inhibition signal steers their queries at END
        s.connect("input", g, "kv", positions=["IO", "S1", "S2"])  # they attend to and copy names
        s.connect(g, "logits")
    s.connect("induction", "S-inhibition", "v")    # S-inhibition heads read the S2 signal through values
    s.connect("duplicate token", "S-inhibition", "v")
    s.connect("previous token", "induction", "k", positions=["S1+1"])  # K-composition
    s.connect("input", "induction", "qv", positions=["S2", "S1+1"])
    s.connect("input", "duplicate token", "qkv", positions=["S1", "S2"])
    s.connect("input", "previous token", "qkv", positions=["S1", "S1+1"])
    s.connect("input", "S-inhibition", "qk", positions=["END", "S2"])
    return s


def greater_than() -> CircuitSpec:
    """Hanna, Liu, Variengien (2023), Section 4: attention heads move the year YY to END, where
    MLPs 8-11 compute which years are greater."""
    s = CircuitSpec(
        name="greater-than circuit", model="gpt2", task="greater-than",
        source="Hanna, Liu, Variengien (2023). How does GPT-2 compute greater-than?: Interpreting mathematical "
               "abilities in a pre-trained language model. NeurIPS 2023, arXiv:2305.00586",
        description="Heads 5.1, 5.5, 6.1, 6.9, 7.10, 8.8, 8.11, 9.1 attend from END to YY (processed by MLP 0) "
                    "and move it; MLPs 8-11 at END turn it into a boost of the years above YY.")
    s.group("YY processing", ["m0"], positions=["YY"])
    s.group("year movers", ["a5.h1", "a5.h5", "a6.h1", "a6.h9", "a7.h10", "a8.h8", "a8.h11", "a9.h1"], positions=["END"])
    s.group("greater-than MLPs", ["m8", "m9", "m10", "m11"], positions=["END"])
    s.connect("input", "YY processing", positions=["YY"])
    s.connect("YY processing", "year movers", "kv")
    s.connect("input", "year movers", "kv", positions=["YY"])
    s.connect("input", "year movers", "q", positions=["END"])
    s.connect("year movers", "greater-than MLPs")
    s.connect("input", "greater-than MLPs", positions=["END"])
    s.connect("greater-than MLPs", "greater-than MLPs")
    s.connect("year movers", "logits")
    s.connect("greater-than MLPs", "logits")
    return s


def induction_toy() -> CircuitSpec:
    """The bundled toy-induction model's circuit, read off the trained model: attention patterns
    (scripts/train_toy_induction.py records them in metrics.json) and single-edge effects."""
    s = CircuitSpec(
        name="toy-induction circuit", model="toy-induction", task="induction",
        source="Found in circuitgraph's bundled toy-induction model (attention-only, 2 layers x 4 heads); the "
               "mechanism is that of Olsson et al. (2022), In-context Learning and Induction Heads, and "
               "Elhage et al. (2021), A Mathematical Framework for Transformer Circuits.",
        description="Layer-0 heads a0.h0 and a0.h1 attend to the previous token (attention on offset 1: 0.95, "
                    "0.96) and a0.h3 to the token two back (offset 2: 0.91); their outputs form the keys of "
                    "the four layer-1 induction heads (K-composition; induction attention 0.85-0.96), which "
                    "read the attended token through their values and write it to the logits.")
    s.group("previous token", ["a0.h0", "a0.h1"], positions=["FIRST+1"])
    s.group("token two back", ["a0.h3"], positions=["FIRST+1"])
    s.group("induction", ["a1.h0", "a1.h1", "a1.h2", "a1.h3"], positions=["END"])
    s.connect("input", "previous token")
    s.connect("input", "token two back")
    s.connect("previous token", "induction", "k")
    s.connect("token two back", "induction", "k")
    s.connect("input", "induction", "qv")
    s.connect("induction", "logits")
    return s


if __name__ == "__main__":
    graph = Graph.from_hf_config(GPT2Config())
    for name, spec in [("ioi_gpt2.json", ioi()), ("greaterthan_gpt2.json", greater_than())]:
        resolved = spec.resolve(graph)
        spec.to_json(SPECS / name)
        print(f"{name}: {len(spec.all_nodes())} nodes, {len(resolved)} edges, positions {sorted(resolved.position_names)}")
    toy = induction_toy()
    print(f"induction_toy.json: {len(toy.resolve(Graph(2, 4)))} edges")
    toy.to_json(SPECS / "induction_toy.json")
