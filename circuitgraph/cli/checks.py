"""Checks the command line makes before any model is loaded, so that no work is lost to a typo:
flag values, the device, and output paths (their folder must exist and be writable)."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from circuitgraph.evaluate.distributed import launched


class CLIError(Exception):
    """A command-line input that cannot work; the message names the flag or file."""


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def finite_float(text: str, shown: str | None = None) -> float:
    """argparse type: a finite number (no nan, no inf); refusals quote ``shown`` (default: ``text``)."""
    shown = text if shown is None else shown
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {shown!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {shown!r}")
    return value


def _float_where(text: str, ok, what: str, shown: str | None = None) -> float:
    shown = text if shown is None else shown
    value = finite_float(text, shown)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {shown!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _float_where(text, lambda v: v >= 0, "a number >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float_where(text, lambda v: v > 0, "a number > 0")


# units a memory size may carry (case ignored), in MiB; a bare number is MiB
SIZE_UNITS = {"k": 1 / 1024, "kib": 1 / 1024, "m": 1, "mib": 1, "g": 1024, "gib": 1024, "t": 1 << 20, "tib": 1 << 20,
              "kb": 1e3 / 2**20, "mb": 1e6 / 2**20, "gb": 1e9 / 2**20, "tb": 1e12 / 2**20}


def memory_mib(text: str) -> float:
    """argparse type: a memory size > 0 in MiB, written as a number of MiB or with a unit (``512MiB``,
    ``8GiB``, ``8G``, ``16GB``)."""
    number = text.strip().rstrip("bBiIkKmMgGtT ")
    unit = text.strip()[len(number):].strip().lower()
    try:
        float(number)
        readable = not unit or unit in SIZE_UNITS
    except ValueError:
        readable = False
    if not readable:
        raise argparse.ArgumentTypeError(f"expected a size such as 512, 512MiB or 8GB, got {text!r}")
    return _float_where(number, lambda v: v > 0, "a number > 0", shown=text) * SIZE_UNITS[unit or "mib"]


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    return _float_where(text, lambda v: 0 <= v <= 1, "a number from 0 to 1")


def check_device(name: str) -> str:
    """The device exists here: a misspelt name or a missing GPU is one line, not a CUDA traceback.
    ``auto`` shards one model over every visible GPU (HF accelerate's ``device_map="auto"``)."""
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            raise CLIError("--device 'auto' shards the model over the visible GPUs, and there are none; use --device cpu")
        if launched():
            raise CLIError("--device 'auto' shards one model over every GPU, while under torchrun each rank holds "
                           "the whole model on its own GPU; use --device cuda")
        return name
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device '{name}': not a device; expected cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cpu":
        return name
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CLIError(f"--device '{name}': {why}; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise CLIError(f"--device '{name}': there {'is' if n == 1 else 'are'} only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return name
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device '{name}': Apple's MPS is not available here; use --device cpu")
        return name
    raise CLIError(f"--device '{name}': device type '{dev.type}' is not supported; expected cpu, cuda, cuda:N, mps or auto")


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, since permission bits lie for root and
    read-only file systems)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".circuitgraph-check-"):
            return True
    except OSError:
        return False


def check_output(path, flag: str = "-o", suffixes: tuple[str, ...] | None = None) -> Path:
    """An output file can be written: not a directory, its folder exists and is writable, and
    (when given) it has one of ``suffixes``."""
    path = Path(path)
    if path.is_dir() or str(path).endswith(os.sep):
        raise CLIError(f"{flag} '{path}' is a directory; expected a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise CLIError(f"{flag} '{path}': unsupported file type '{path.suffix or '(none)'}'; expected {', '.join(suffixes)}")
    folder = path.parent
    if not folder.exists():
        raise CLIError(f"{flag} '{path}': folder '{folder}' does not exist; create it first")
    if not folder.is_dir():
        raise CLIError(f"{flag} '{path}': '{folder}' is not a folder")
    if not _writable(folder):
        raise CLIError(f"{flag} '{path}': folder '{folder}' is not writable")
    return path


def check_output_dir(path, flag: str = "-o") -> Path:
    """An output folder can be made or written: an existing file is not a folder, and the nearest
    existing ancestor must be writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} '{path}' is a file; expected a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not _writable(existing):
        raise CLIError(f"{flag} '{path}': '{existing}' is not a writable folder")
    return path
