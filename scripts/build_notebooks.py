"""Write the worked-example notebooks in notebooks/ (the cells live here, so diffs stay readable).

    python scripts/build_notebooks.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parents[1] / "notebooks"

TOY = [
    ("md", "# Induction in `toy-induction`, end to end\n\nIdentify a circuit, measure that it exists and is "
           "connected, characterise its parts, discover it automatically, draw it. Runs offline on the bundled "
           "2-layer attention-only model in well under a minute."),
    ("code", "import warnings; warnings.simplefilter('ignore')\nfrom pathlib import Path\nfrom IPython.display import Image, display\n"
             "import circuitgraph as cg\nfrom circuitgraph.data.tasks import make_data\n\nout = Path('toy-induction-figures'); out.mkdir(exist_ok=True)\n"
             "model = cg.load_model('toy-induction')\nrows = make_data('induction', model.tokenizer, 64, seed=0)\n"
             "data = cg.tokenize([cg.data.Example(**r) for r in rows], model.tokenizer)\nprint(model, len(data), 'prompts'); rows[0]"),
    ("md", "## 1. Hypothesis\nPrevious-token heads in layer 0 write the previous token into the residual stream; "
           "induction heads in layer 1 use it as their *key* (K-composition), attend to the token after the earlier "
           "occurrence of the current token, and copy it through their *values*."),
    ("code", "spec = cg.CircuitSpec.load('induction_toy')  # a shipped spec, by name\n"
             "print(spec.description)\nev = cg.Evaluator(model, data, progress=False)\nscore = ev.evaluate(spec)\n"
             "print(f'faithfulness {score.faithfulness:.3f} ± {score.faithfulness_se:.3f}, necessity {score.necessity:.3f} ± {score.necessity_se:.3f}')\n"
             "assert score.faithfulness > 0.9"),
    ("md", "## 2. Which edges carry it?\nThe drop in faithfulness when each edge alone is removed. The query edges "
           "do nothing here: clean and corrupted prompts end with the same tokens."),
    ("code", "effects = ev.edge_effects(spec)\nfor edge, (drop, se) in sorted(effects.items(), key=lambda kv: -kv[1][0])[:8]:\n"
             "    print(f'{edge:22s} {drop:+.3f} ± {se:.3f}')"),
    ("md", "## 3. Connection evidence: path patching\nFrom every head to the induction heads' keys, and to their queries."),
    ("code", "from circuitgraph.evaluate.path_patching import path_patch_sweep, plot_path_patching\n"
             "induction = spec.groups['induction'].nodes\n"
             "to_k = path_patch_sweep(model, data, [f'{h}<k>' for h in induction], evaluator=ev)\n"
             "to_q = path_patch_sweep(model, data, [f'{h}<q>' for h in induction], evaluator=ev)\n"
             "print('keys:', to_k.top(3)); print('queries:', to_q.top(3))\n"
             "display(Image(plot_path_patching(to_k, out / 'path_patching_keys.png')))"),
    ("md", "## 4. Characterisation\nAttention patterns on a repeated sequence, head-type scores, and the OV circuit's copying score."),
    ("code", "from circuitgraph.characterise import attention_patterns, plot_attention, head_scores, copying_scores\n"
             "pats = attention_patterns(model, rows[0]['clean'], heads=['a0.h0', 'a0.h3', 'a1.h1'])\n"
             "display(Image(plot_attention(pats, out / 'attention.png')))\n"
             "hs = head_scores(model)\nfor kind in ('previous_token', 'induction'):\n"
             "    s = hs.scores[kind]; L, H = divmod(int(s.argmax()), s.shape[1]); print(kind, f'top head a{L}.h{H}', round(float(s.max()), 3))\n"
             "print('copying (OV) scores:\\n', copying_scores(model).round(decimals=2))"),
    ("md", "## 5. Discovery without the hypothesis\nEAP-IG scores every edge; its top edges recover the circuit."),
    ("code", "from circuitgraph.discovery import discover, faithfulness_curve, roc_auc\n"
             "scores = discover(ev, 'eap-ig', steps=5, progress=False)\n"
             "auc, _, _ = roc_auc(scores, spec.resolve(model.graph).edge_mask())\n"
             "curve = faithfulness_curve(ev, scores)\ncurve.plot(out / 'curve.png')\n"
             "found = scores.to_spec(scores.greedy(33), prune=True)\nprint(f'AUC {auc:.3f}, CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}; '\n"
             "      f'top-33 greedy circuit faithfulness {ev.evaluate(found).faithfulness:.3f}')\ndisplay(Image(out / 'curve.png'))"),
    ("md", "## 6. The figure"),
    ("code", "from circuitgraph.render import render\nverified = {k: v[0] for k, v in effects.items()}\n"
             "render(spec, model.graph, out / 'induction.png', verified=verified, title='toy-induction circuit')\n"
             "display(Image(out / 'induction.png'))"),
]

IOI = [
    ("md", "# IOI: GPT-2's circuit, or the offline playground\n\nWith the hub, this evaluates Wang et al.'s 26-head "
           "circuit (the shipped `ioi_gpt2` spec) on `gpt2`. Without it, the same steps run on the bundled `toy-ioi` "
           "model, whose circuit is not known in advance: there we *discover* it, then check and characterise it."),
    ("code", "import warnings; warnings.simplefilter('ignore')\nfrom pathlib import Path\nimport circuitgraph as cg\n"
             "from circuitgraph.data.tasks import make_data\n\ntry:\n    model, offline = cg.load_model('gpt2'), False\n"
             "except Exception as e:\n    print('hub unavailable, using the bundled toy-ioi model:', str(e)[:100])\n"
             "    model, offline = cg.load_model('toy-ioi'), True\n"
             "rows = make_data('ioi', model.tokenizer, 48, seed=0)\n"
             "data = cg.tokenize([cg.data.Example(**r) for r in rows], model.tokenizer)\nev = cg.Evaluator(model, data, progress=False)\n"
             "print(model, f'clean logit diff {ev.clean_values.mean():.2f}, corrupted {ev.base_values.mean():.2f}')"),
    ("md", "## The hypothesis\nOn `gpt2`: the published circuit, with each class acting at its positions. Offline: "
           "EAP-IG proposes one."),
    ("code", "from circuitgraph.discovery import discover\nif not offline:\n"
             "    spec = cg.CircuitSpec.load('ioi_gpt2')\nelse:\n"
             "    scores = discover(ev, 'eap-ig', steps=5, progress=False)\n"
             "    spec = scores.to_spec(scores.greedy(40), prune=True)\n"
             "score = ev.evaluate(spec)\nprint(f'{score.n_edges} edges: faithfulness {score.faithfulness:.3f} ± {score.faithfulness_se:.3f}, '\n"
             "      f'necessity {score.necessity:.3f} ± {score.necessity_se:.3f}')"),
    ("md", "## Which heads matter, and what they attend to"),
    ("code", "nodes = ev.node_effects(spec)\nfor n, (drop, se) in sorted(nodes.items(), key=lambda kv: -kv[1][0])[:6]:\n"
             "    print(f'{n:8s} {drop:+.3f} ± {se:.3f}')\n"
             "from circuitgraph.characterise import direct_logit_attribution\n"
             "dla = direct_logit_attribution(model, data)\nprint('direct logit attribution per head:\\n', dla.heads.round(decimals=2))"),
    ("code", "from circuitgraph.render import render\nrender(spec, model.graph, 'ioi_circuit.png', collapse_groups=not offline,\n"
             "       title='IOI circuit' + (' (toy-ioi, discovered)' if offline else ''))"),
]


def build(cells):
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    nbformat.write(build(TOY), OUT / "01_toy_induction.ipynb")
    nbformat.write(build(IOI), OUT / "02_ioi.ipynb")
    print("wrote", OUT / "01_toy_induction.ipynb", OUT / "02_ioi.ipynb")
