"""Load a model once, from a hub name, a local HuggingFace directory, a bundled model name or a GGUF file.

One path serves them all: the name is resolved to something ``from_pretrained`` accepts (a GGUF file,
or a documented name such as ``smollm2-135m-q4``, becomes its cached dequantized folder), the
architecture is checked against what the engine can patch *before* weights are read, and the
result wraps the HF model, its tokenizer, its graph, the patching engine and (built on first use)
a TransformerLens ``TransformerBridge`` with the per-head q/k/v-input and result hooks on.
"""

from __future__ import annotations

import os
from functools import cached_property
from pickle import UnpicklingError
from pathlib import Path

import torch
from safetensors import SafetensorError

from circuitgraph.data.dataset import DataError
from circuitgraph.model.families import architecture_name, describe_config, extract_weights
from circuitgraph.model.weights import UnsupportedArchitecture
from circuitgraph.engine import PatchEngine
from circuitgraph.graph.computational_graph import Graph
from circuitgraph.model.names import check_hub_name, named_file, unknown_model_message

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "bundled"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelLoadError(ValueError):
    """A model name or directory that cannot be loaded (the message says what was expected)."""


def bundled_models() -> list[str]:
    """Names of the models shipped with the package (each a folder with a ``config.json``)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def resolve(name: str | os.PathLike) -> str:
    """Bundled name -> its directory; named model or ``.gguf`` file -> the file; local directory -> checked path;
    anything else -> hub id."""
    name = str(name)
    if name in bundled_models():
        return str(BUNDLED_DIR / name)
    file, why = named_file(name)
    if why:
        raise ModelLoadError(why)
    if file:
        return file
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            if path.suffix.lower() == ".gguf":
                return str(path)
            raise ModelLoadError(f"model '{name}': is a file; expected a .gguf file, a HuggingFace model directory (config.json + weights), a hub name or one of the bundled models {bundled_models()}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory '{name}' has no config.json; expected a HuggingFace model directory (config.json + model.safetensors + tokenizer files)")
        if not any((path / f).is_file() for f in _WEIGHT_FILES):
            raise ModelLoadError(f"model directory '{name}' has no weights; expected one of {', '.join(_WEIGHT_FILES)}")
        return str(path)
    if name.lower().endswith(".gguf"):
        raise ModelLoadError(f"model '{name}': no such GGUF file")
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelLoadError(f"model '{name}': no such directory")
    return name


class CircuitModel:
    """A causal LM ready for circuit work: HF model, tokenizer, graph and patching engine."""

    def __init__(self, hf_model, tokenizer=None, name: str = "model", check_exact: bool = True,
                 quantization: str | None = None):
        describe_config(hf_model.config)  # raises UnsupportedArchitecture with the reason
        _refuse_offload(hf_model, name)
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.name = name
        # what the weights were before this model saw them, e.g. "Q4_1 (GGUF, dequantized to float32)"; None: as stored
        self.quantization = quantization
        self.config = hf_model.config
        self.graph = Graph.from_hf_config(self.config)
        self.weights = extract_weights(self.hf)
        self.engine = PatchEngine(self.weights, self.graph)
        self.check_exact = check_exact  # the run-time guard (circuitgraph.model.guard); off only when asked
        self._verified_lengths: set[int] = set()

    def verify(self, tokens: torch.Tensor, last: torch.Tensor, engine_logits: torch.Tensor | None = None) -> None:
        """Run the exactness guard once per prompt length (a no-op when ``check_exact`` is off)."""
        if not self.check_exact or tokens.shape[1] in self._verified_lengths:
            return
        from circuitgraph.model.guard import check_exact

        check_exact(self, tokens, last, engine_logits)
        self._verified_lengths.add(tokens.shape[1])

    def check_padding(self, data) -> None:
        """Refuse prompts of different lengths when attention is bidirectional (tracr programs such as
        sort): a shorter prompt would attend to its padding, so every number would be silently off."""
        if data.same_length or all(layer.attn.causal for layer in self.weights.layers):
            return
        i = int((data.lengths != data.lengths[0]).nonzero()[0, 0])
        raise DataError(f"{data.where(i)}: the prompt is {int(data.lengths[i])} tokens but {data.where(0)} is {int(data.lengths[0])}; "
                        "this model's attention is bidirectional, so a shorter prompt would attend to its padding: "
                        "every prompt must have the same length")

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's device; a sharded model's layers may sit elsewhere)."""
        return self.hf.get_input_embeddings().weight.device

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks=(), logit_positions: torch.Tensor | None = None) -> torch.Tensor:
        """The engine's forward with TransformerLens-named hooks (:mod:`circuitgraph.engine.hooks`), guarded."""
        tokens = tokens.to(self.device)
        self._verify_plain(tokens)
        return self.engine.run_with_hooks(tokens, fwd_hooks, logit_positions)

    def run_with_cache(self, tokens: torch.Tensor, names_filter=None, logit_positions: torch.Tensor | None = None):
        """``(logits, cache)`` of the engine's forward, guarded; names as in TransformerLens."""
        tokens = tokens.to(self.device)
        self._verify_plain(tokens)
        return self.engine.run_with_cache(tokens, names_filter, logit_positions)

    def _verify_plain(self, tokens: torch.Tensor) -> None:
        """The guard on a forward of whole prompts (logits compared at the last position)."""
        with torch.no_grad():
            self.verify(tokens, torch.full((len(tokens),), tokens.shape[1] - 1, device=tokens.device))

    @cached_property
    def bridge(self):
        """A TransformerLens ``TransformerBridge`` around the same weights, per-head hooks on.

        Built on first use because bridging rewires the HF module tree in place.
        """
        from transformer_lens.model_bridge.sources import build_bridge_from_module

        tok = self.tokenizer
        if tok is not None and "name_or_path" not in getattr(tok, "init_kwargs", {}):
            tok = None  # TransformerLens re-loads tokenizers by path; an in-memory one cannot be
        bridge = build_bridge_from_module(self.hf, architecture_name(self.config), hf_config=self.config,
                                          tokenizer=tok, model_name=self.name)
        bridge.set_use_split_qkv_input(True)
        bridge.set_use_attn_result(True)
        return bridge

    def __repr__(self) -> str:
        i = self.weights.info
        return f"CircuitModel({self.name!r}, {i.family}, layers={i.n_layers}, heads={i.n_heads}, d_model={i.d_model})"


def load_model(name: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               check_exact: bool = True, device_map: str | dict | None = None) -> CircuitModel:
    """Load ``name`` (hub id, local HF directory, bundled model name, ``.gguf`` file or a named model such as
    ``smollm2-135m-q4``) for patching.

    A GGUF file is dequantized once and cached as a HF folder (:mod:`circuitgraph.model.gguf_files`), then
    loaded like any other in ``dtype``; the model's name is the file's and ``quantization`` says what it held.
    ``check_exact=False`` turns off the run-time comparison with the HF forward (:mod:`circuitgraph.model.guard`).
    ``device_map`` (e.g. ``"auto"``) shards a model too large for one device through HF accelerate; the
    engine then runs each layer on the device that holds it (``device`` is ignored).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from circuitgraph.model import gguf_files  # it imports this module: imported here, not at the top

    where, quantization = resolve(name), None
    if gguf_files.is_gguf(where):
        file = Path(where).name  # the model's name: it says the quantization (SmolLM2-135M-Instruct.Q4_1.gguf)
        where, kind = gguf_files.cached_folder(where, str(name))
        name, quantization = file, f"{kind} (GGUF, dequantized to {str(dtype).removeprefix('torch.')})"
    if not Path(where).is_dir() and (why := check_hub_name(where, bundled_models())):
        raise ModelLoadError(why)  # in seconds, before any hub call and its retries
    try:
        config = AutoConfig.from_pretrained(where)
    except OSError as e:
        if Path(where).is_dir():
            raise ModelLoadError(f"model directory '{name}': could not read config.json ({str(e).splitlines()[0]})") from None
        raise ModelLoadError(unknown_model_message(str(name), bundled_models(),
                                                   f"the hub could not provide it ({str(e).splitlines()[0]})")) from None
    describe_config(config)
    try:
        extra = {} if device_map is None else {"device_map": device_map}
        hf = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="eager", **extra)
    except OSError as e:
        raise ModelLoadError(f"model '{name}': could not read weights ({str(e).splitlines()[0]})") from None
    except (SafetensorError, RuntimeError, EOFError, UnpicklingError) as e:  # a damaged or truncated weights file
        first = next(iter(str(e).splitlines()), "")
        raise ModelLoadError(f"model '{name}': its weights file is damaged or unreadable ({type(e).__name__}: {first}); "
                             f"download or save it again") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model '{name}': could not load its tokenizer ({str(e).splitlines()[0]})") from None
    if quantization is not None:
        tokenizer.name_or_path = name  # messages name the file, not its cache folder (init_kwargs keep the folder)
    return CircuitModel(hf if device_map is not None else hf.to(device), tokenizer, name=str(name), check_exact=check_exact,
                        quantization=quantization)


def _refuse_offload(hf, name: str):
    """accelerate offloads what does not fit on the devices (weights on ``meta``, brought in by hooks at each
    forward); the engine reads the weights themselves, so such a model cannot run here."""
    if not any(p.device.type == "meta" for p in hf.parameters()):
        return
    where = sorted({str(v) for v in getattr(hf, "hf_device_map", {}).values() if str(v) in ("cpu", "disk")}) or ["meta"]
    raise ModelLoadError(f"model '{name}' does not fit on the devices: accelerate offloaded part of it to "
                         f"{' and '.join(where)}, which the engine cannot run; use more or larger GPUs, a half-precision "
                         f"dtype, or the CPU alone (device_map={{'': 'cpu'}}, or --device cpu)")


def from_config(config, seed: int = 0, tokenizer=None) -> CircuitModel:
    """A random-init model of a HF config (tests, benchmarks, shape studies)."""
    from transformers import AutoModelForCausalLM

    describe_config(config)
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(config)
    return CircuitModel(hf, tokenizer, name=f"random-{config.model_type}")


__all__ = ["CircuitModel", "ModelLoadError", "UnsupportedArchitecture", "bundled_models", "from_config", "load_model", "resolve"]
