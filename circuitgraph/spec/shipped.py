"""Circuit specs shipped with the package, named without a path (``--spec induction_toy``).

One resolver serves every place a spec is taken (``CircuitSpec.load``, so every command): an
existing file wins; otherwise a bare name (with or without ``.json``) is looked up among the
shipped specs, so the README's commands work from any directory, not only from a checkout.
"""

from __future__ import annotations

import difflib
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "specs"


def shipped_specs() -> list[str]:
    """Names of the shipped circuit specs (the JSON Schema is not one)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json") if not p.name.endswith(".schema.json"))


def resolve_spec(path: str | Path) -> Path:
    """An existing file as given; else the shipped spec of that name; else the path unchanged (the
    caller's 'does not exist' error then lists the shipped names, see :func:`missing_spec_hint`)."""
    path = Path(path)
    if path.exists() or len(path.parts) > 1 and path.parts[0] not in ("specs", "circuitgraph"):
        return path
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    if stem in shipped_specs():
        return SHIPPED_DIR / f"{stem}.json"
    return path


def missing_spec_hint(path: str | Path) -> str:
    """'; did you mean ...' over the shipped specs, plus what ships, for a 'does not exist' error."""
    names = shipped_specs()
    stem = Path(path).name.removesuffix(".json")
    close = difflib.get_close_matches(stem, names, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{hint} (shipped specs, usable by name: {', '.join(names)})" if names else hint
