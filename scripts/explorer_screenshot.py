"""docs/explorer.png: the demo's study page (toy-induction, hypothesis vs EAP-IG) in headless Chromium.

    python scripts/explorer_screenshot.py [OUT.png]
"""
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from chromium import Browser, find_chromium  # noqa: E402

from circuitgraph.data.dataset import Example, tokenize  # noqa: E402
from circuitgraph.data.tasks import make_data  # noqa: E402
from circuitgraph.discovery import discover  # noqa: E402
from circuitgraph.evaluate.evaluator import Evaluator  # noqa: E402
from circuitgraph.explore import Study  # noqa: E402
from circuitgraph.model.loading import load_model  # noqa: E402
from circuitgraph.spec.circuit_spec import CircuitSpec  # noqa: E402

out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "explorer.png"
exe, why = find_chromium()
if exe is None:
    sys.exit(why)
warnings.simplefilter("ignore")
model = load_model("toy-induction")
data = tokenize([Example(**r) for r in make_data("induction", model.tokenizer, 64, seed=0)], model.tokenizer)
spec = CircuitSpec.load(ROOT / "circuitgraph" / "specs" / "induction_toy.json")
ev = Evaluator(model, data, progress=False)
scores = discover(ev, "eap-ig", steps=5, progress=False)
n = len(spec.resolve(model.graph))
found = scores.to_spec(scores.greedy(n), prune=True, selection=f"greedy top {n}")
found.name = "EAP-IG circuit"
with tempfile.TemporaryDirectory() as tmp:
    page = Study.collect(model, data, spec, found, evaluator=ev, title="toy-induction: hypothesis vs EAP-IG").to_html(Path(tmp) / "study.html")
    b = Browser(exe, width=1500, height=1000)
    try:
        b.open(page)
        b.click('#circuit-overlay .node[data-id="a1.h0"]')
        b.call("Input.dispatchMouseEvent", type="mouseMoved", x=1000, y=60)  # no tooltip in the picture
        b.screenshot(out)
        if b.errors():
            sys.exit(f"console errors: {b.errors()}")
    finally:
        b.close()
print(f"wrote {out}")
