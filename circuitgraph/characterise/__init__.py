"""Characterising circuit components once a circuit is found: what each head, MLP and neuron does.

One concept per module, each returning tensors / small dataclasses with labelled axes and, where
people look at the result, a ``plot_*`` function writing a PNG:

- :mod:`.heads`: attention patterns, head-type scores (previous-token, duplicate, induction, copying, DLA)
- :mod:`.dla`: direct logit attribution of every node
- :mod:`.logit_lens`: decoding residual streams and single nodes into predictions
- :mod:`.qkov`: QK and OV circuits through the (un)embedding, copying scores
- :mod:`.neurons`: most active MLP neurons and single-neuron ablations
- :mod:`.probes`: linear probes on a node's output
- :mod:`.attribution`: integrated gradients to input tokens
- :mod:`circuitgraph.plots`: the shared heatmap helpers (also under ``.plots``)
"""

from circuitgraph.characterise.integrated_gradients import IGResult, integrated_gradients, plot_attributions
from circuitgraph.characterise.dla import DLAResult, direct_logit_attribution, plot_dla
from circuitgraph.characterise.heads import (AttentionPatterns, HeadScores, attention_patterns, detection_scores, head_scores, plot_attention,
                    plot_head_scores, repeated_tokens)
from circuitgraph.characterise.logit_lens import LensComparison, LensResult, lens_without, logit_lens, node_lens, plot_logit_lens
from circuitgraph.characterise.neurons import NeuronActivity, NeuronEffects, neuron_ablation, neuron_activations, plot_neurons, top_neurons
from circuitgraph.characterise.probes import ProbeResult, node_activations, probe_node, train_probe
from circuitgraph.characterise.qkov import HeadCircuit, copying_scores, full_matrix, ov_circuit, plot_circuit, positional_qk, qk_circuit

__all__ = ["AttentionPatterns", "DLAResult", "HeadCircuit", "HeadScores", "IGResult", "LensComparison", "LensResult",
           "NeuronActivity", "NeuronEffects", "ProbeResult", "attention_patterns", "copying_scores", "detection_scores",
           "direct_logit_attribution", "full_matrix", "head_scores", "integrated_gradients", "lens_without", "logit_lens",
           "neuron_ablation", "neuron_activations", "node_activations", "node_lens", "ov_circuit", "plot_attention",
           "plot_attributions", "plot_circuit", "plot_dla", "plot_head_scores", "plot_logit_lens", "plot_neurons",
           "positional_qk", "probe_node", "qk_circuit", "repeated_tokens", "top_neurons", "train_probe"]
