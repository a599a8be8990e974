"""``circuitgraph explore``: write a study's explorer page."""

from __future__ import annotations

from pathlib import Path


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("explore", help="write an interactive HTML page of a circuit study (opens offline in a browser)")
    p.add_argument("--model", required=True, help="hub name, local HuggingFace directory or bundled model name")
    p.add_argument("--data", required=True, help="JSONL dataset (clean, corrupted, answer, wrong[, positions])")
    p.add_argument("--spec", required=True, help="circuit spec JSON (ours or EAP-IG/MIB), e.g. the hypothesis")
    p.add_argument("--compare", default=None, help="a second circuit spec (e.g. a discovered one), shown overlaid or side by side")
    p.add_argument("-o", "--output", required=True, type=Path, help="the page, .html")
    p.add_argument("--prepend-bos", action="store_true", help="put the BOS token first (TransformerLens habit)")
    p.add_argument("--metric", choices=["logit_diff", "prob_diff", "kl", "accuracy"], default="logit_diff")
    p.add_argument("--ablation", choices=["corrupted", "mean", "zero"], default="corrupted")
    p.add_argument("--examples", type=int, default=8, help="dataset rows the page's example picker offers (the first ones)")
    p.add_argument("--top-edges", type=int, default=1000, help="scored edges outside the circuits to embed, best |score| first")
    p.add_argument("--title", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_explore)


def _cmd_explore(args) -> int:
    import warnings

    from circuitgraph.data.dataset import load_dataset
    from circuitgraph.evaluate.evaluator import Evaluator
    from circuitgraph.explore.study_data import Limits
    from circuitgraph.explore.study import Study
    from circuitgraph.model.loading import load_model
    from circuitgraph.spec.circuit_spec import CircuitSpec

    if args.output.suffix.lower() not in (".html", ".htm"):  # fail before loading anything
        raise ValueError(f"cannot write '{args.output}': an explorer page is HTML; give -o a path ending in .html")
    if args.examples < 1:
        raise ValueError(f"--examples must be at least 1, got {args.examples}")
    if args.top_edges < 0:
        raise ValueError(f"--top-edges must be at least 0, got {args.top_edges}")
    spec = CircuitSpec.load(args.spec)
    other = CircuitSpec.load(args.compare) if args.compare else None
    model = load_model(args.model, device=args.device)
    data = load_dataset(args.data, model.tokenizer, prepend_bos=args.prepend_bos, vocab_size=model.weights.W_U.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = Evaluator(model, data, metric=args.metric, ablation=args.ablation, batch_size=args.batch_size, progress=False)
        study = Study.collect(model, data, spec, other, evaluator=ev, title=args.title, model_name=args.model,
                              limits=Limits(examples=args.examples, top_edges=args.top_edges))
    path = study.to_html(args.output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); open it in a browser")
    return 0
