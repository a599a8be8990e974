"""Assemble one self-contained HTML file: the template with its style, D3 and the explorer script inlined.

The study's data goes in as JSON inside a ``<script type="application/json">`` element; ``<``, ``>``
and ``&`` are escaped as JSON unicode escapes so no prompt text can end the element early.
"""

from __future__ import annotations

import html
import json
import re
from importlib.resources import files

ASSETS = files("circuitgraph.explore")


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def _json(data: dict) -> str:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _script(code: str) -> str:
    return code.replace("</script", "<\\/script")


def html_page(data: dict) -> str:
    """The page for a study's data (see :mod:`circuitgraph.explore.study_data`)."""
    page = _asset("page.html")
    parts = {"{{TITLE}}": html.escape(data.get("title") or "circuit study"), "{{STYLE}}": _asset("explorer.css"),
             "{{D3}}": _script(_asset("vendor/d3.min.js")), "{{DATA}}": _json(data),
             "{{SCRIPT}}": _script(_asset("explorer.js"))}
    return re.sub(r"\{\{[A-Z0-9]+\}\}", lambda m: parts[m.group(0)], page)  # one pass: inserted text is never rescanned


__all__ = ["html_page"]
