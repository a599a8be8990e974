"""Writing a trained toy model into circuitgraph/bundled/, shared by the training scripts."""

import json
from pathlib import Path


def save_bundle(model, tokenizer, out: Path, metrics: dict) -> None:
    """Model (safetensors), tokenizer and metrics.json in HF format, readable by every user."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # name the class transformers 4.x also knows (5.x writes its new "TokenizersBackend")
    tc = out / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the package is shared
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
