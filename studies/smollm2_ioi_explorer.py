"""The explorer page of the IOI study of SmolLM2-135M-Instruct: the path-patching circuit
(``specs/ioi_smollm2.json``) overlaid on the circuit EAP-IG finds, on held-out IOI prompts.

    python studies/smollm2_ioi_explorer.py [--model smollm2-135m-q4] [-n 32] [--top-n 300]

Runs, as a user would, ``make-data ioi`` (seed 1: the rows the spec was evaluated on, not those it
was found on), ``discover --method eap-ig --top-n N --prune`` and ``explore --spec ioi_smollm2
--compare <found>``, and writes ``docs/ioi_smollm2_explorer.html`` (self-contained, opens offline)
with a screenshot ``docs/ioi_smollm2_explorer.png`` where a Chromium is installed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "ioi_smollm2_explorer.html"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-q4")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--top-n", type=int, default=300, help="edges of the EAP-IG circuit shown beside the spec")
    args = ap.parse_args(argv)

    from circuitgraph.cli import main as cli

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data, found = Path(tmp) / "ioi.jsonl", Path(tmp) / "eap_ig.json"
        common = ["--model", args.model, "--data", str(data)]
        for argv_ in (["make-data", "ioi", "--model", args.model, "-n", str(args.n), "--seed", "1", "-o", str(data)],
                      ["discover", *common, "--method", "eap-ig", "--top-n", str(args.top_n), "--prune", "-o", str(found)],
                      ["explore", *common, "--spec", "ioi_smollm2", "--compare", str(found), "-o", str(PAGE),
                       "--title", f"IOI in {args.model}: path patching (ioi_smollm2) vs EAP-IG top {args.top_n}"]):
            print("$ circuitgraph " + " ".join(argv_), flush=True)
            if cli(argv_) != 0:
                return 1
    print(f"page written in {time.perf_counter() - t0:.0f} s: {PAGE}")
    sys.path.insert(0, str(ROOT / "tests"))
    from chromium import Browser, find_chromium

    exe, why = find_chromium()
    if exe is None:
        print(f"no screenshot: {why}")
        return 0
    browser = Browser(exe, width=1500, height=1000)
    try:
        browser.open(PAGE)
        shot = browser.screenshot(PAGE.with_suffix(".png"))
        from PIL import Image  # the page's top, 900 px wide, in a palette: a figure for the docs, not a copy of the page

        im = Image.open(shot)
        im = im.resize((900, round(im.size[1] * 900 / im.size[0])), Image.LANCZOS)
        im.crop((0, 0, 900, int(im.size[1] * 0.45))).quantize(colors=128).save(shot, optimize=True)
    finally:
        browser.close()
    print(f"screenshot: {shot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
