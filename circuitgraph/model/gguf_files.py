"""GGUF model files: dequantized once by transformers' own GGUF loader, then cached as a HF folder.

Reading a GGUF through transformers parses its metadata several times and dequantizes every
tensor in numpy (half a minute for a 135M-parameter file on two cores).  The result is saved once
as an ordinary HuggingFace folder (float32 safetensors, which hold every dequantized value
exactly, plus the tokenizer) under ``<cache>/gguf/<sha256 of the file>``; later loads read that
folder through the usual path, in whatever dtype is asked for (about a second for that file).
The folder appears by one rename of a finished temporary folder, so an interrupted conversion
never leaves a half-written model.  Being float32, the copy takes 4 bytes a weight on disk (and
the conversion as much in memory): 0.5 GB for 135M weights, 32 GB for an 8B model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

from circuitgraph.model.loading import ModelLoadError

SUFFIX = ".gguf"
MARKER = "circuitgraph-gguf.json"  # written last into the temporary folder: what the file was
INSTALL = "pip install gguf"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an existing ``.gguf`` file."""
    return str(path).lower().endswith(SUFFIX) and Path(path).is_file()


def cache_root() -> Path:
    """``$CIRCUITGRAPH_CACHE``, else ``$XDG_CACHE_HOME/circuitgraph``, else ``~/.cache/circuitgraph``."""
    if os.environ.get("CIRCUITGRAPH_CACHE"):
        return Path(os.environ["CIRCUITGRAPH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "circuitgraph"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The file's content hash, read in 4 MiB pieces (GGUF files are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_magic(path: Path, name: str) -> None:
    """Refuse, in one line, a file that is not GGUF at all (before hashing gigabytes of it)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise ModelLoadError(f"model '{name}': not a GGUF file (it does not start with the bytes 'GGUF'); "
                             f"expected a .gguf model file as llama.cpp writes it")


def file_type(path: Path, name: str) -> str:
    """The quantization the file declares (``general.file_type``, e.g. ``Q4_1``), else its most common tensor type."""
    from collections import Counter

    import gguf

    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields.get("general.file_type")
        if field is not None:
            kind = gguf.LlamaFileType(int(field.contents())).name
            return kind.removeprefix("MOSTLY_")
        counts = Counter(t.tensor_type.name for t in reader.tensors if t.n_elements > 1 and len(t.shape) > 1)
    except Exception as e:  # noqa: BLE001 -- the reader raises whatever a truncated or corrupt file provokes
        raise ModelLoadError(f"model '{name}': the GGUF file is damaged or truncated ({type(e).__name__}: "
                             f"{next(iter(str(e).splitlines()), '')}); download it again") from None
    return counts.most_common(1)[0][0] if counts else "unknown"


def cached_folder(gguf_path: str | os.PathLike, name: str) -> tuple[str, str]:
    """``(HF folder, quantization)`` of a GGUF file, converting it on first use.

    ``quantization`` is the file's type (``Q4_1``); the caller says what it was dequantized to."""
    path = Path(gguf_path).expanduser().resolve()
    check_magic(path, name)
    root = cache_root() / "gguf"
    digest = sha256(path)
    final = root / digest
    if (final / MARKER).is_file():
        return str(final), json.loads((final / MARKER).read_text())["file_type"]
    if find_spec("gguf") is None:
        raise ModelLoadError(f"model '{name}': reading a GGUF file needs the gguf package; {INSTALL}")
    kind = file_type(path, name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=root))
    except OSError as e:
        raise ModelLoadError(f"model '{name}': cannot write its converted copy under {root} ({e.strerror or e}); "
                             f"set CIRCUITGRAPH_CACHE to a writable folder") from None
    try:
        _convert(path, tmp, name)
        (tmp / MARKER).write_text(json.dumps({"source": path.name, "sha256": digest, "file_type": kind}, indent=1) + "\n")
        _share(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / MARKER).is_file():  # not another process finishing first: a real failure
                raise
    except OSError as e:
        raise ModelLoadError(f"model '{name}': cannot write its converted copy under {root} ({e.strerror or e}); "
                             f"free some space or set CIRCUITGRAPH_CACHE to another folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final), kind


def _share(folder: Path) -> None:
    """The modes a plain mkdir and write would have given (a temporary folder is private to its owner)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _convert(path: Path, out: Path, name: str) -> None:
    """transformers' GGUF loader, dequantized to float32, saved as safetensors + tokenizer into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from circuitgraph.model.families import describe_config

    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    try:
        config = AutoConfig.from_pretrained(**where)
    except (ValueError, KeyError, OSError) as e:  # e.g. "GGUF model with architecture X is not supported yet."
        raise ModelLoadError(f"model '{name}': transformers cannot read this GGUF file "
                             f"({next(iter(str(e).splitlines()), type(e).__name__)})") from None
    describe_config(config)  # an architecture the engine cannot patch is refused before dequantizing
    try:
        hf = AutoModelForCausalLM.from_pretrained(**where, config=config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except (ValueError, KeyError, TypeError, NotImplementedError, RuntimeError) as e:  # a tensor or tokenizer type it lacks
        raise ModelLoadError(f"model '{name}': transformers could not convert this GGUF file ({type(e).__name__}: "
                             f"{next(iter(str(e).splitlines()), '')})") from None
    # the weights are plain float32 now: the saved folder must not ask to be read as GGUF again
    for holder in (hf.config, config):
        if hasattr(holder, "quantization_config"):
            del holder.quantization_config
    hf.hf_quantizer = None
    hf.is_quantized = False
    hf.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


__all__ = ["SUFFIX", "cache_root", "cached_folder", "is_gguf", "sha256"]
