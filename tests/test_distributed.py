"""torch.distributed: two CPU ranks (gloo) give what one process gives, for evaluation, EAP,
EAP-IG and ACDC, from Python and from ``torchrun -m circuitgraph``."""

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from circuitgraph.evaluate import distributed as dist
from conftest import WORLD, free_port

TOL = 1e-6


def _case():
    """The same random model and data in every process (seeded)."""
    from transformers import GPT2LMHeadModel

    from circuitgraph.data.dataset import Example, tokenize
    from circuitgraph.model.loading import CircuitModel
    from conftest import gpt2_config, make_tokenizer, randomize_norms, signal_rows

    torch.manual_seed(0)
    model = CircuitModel(randomize_norms(GPT2LMHeadModel(gpt2_config())), make_tokenizer())
    data = tokenize([Example(**r) for r in signal_rows(model, 10, seed=3)], model.tokenizer)
    return model, data


def _results(model, data) -> dict:
    from circuitgraph.discovery import acdc, attribute
    from circuitgraph.evaluate.evaluator import Evaluator

    out = {}
    ev = Evaluator(model, data, batch_size=3, progress=False)  # 4 batches, the last one short
    eap = attribute(ev, "eap", progress=False)
    spec = eap.to_spec(eap.top_n(25))
    for k, v in ev.evaluate(spec).to_dict().items():
        if isinstance(v, float):
            out[f"evaluate.{k}"] = v
    out["clean_values"] = ev.clean_values
    out["eap"] = eap.scores.nan_to_num().numpy()
    out["eap-ig"] = attribute(ev, "eap-ig", steps=3, progress=False).scores.nan_to_num().numpy()
    from circuitgraph.spec.circuit_spec import CircuitSpec, Edge

    positional = CircuitSpec(edges=[Edge(edge=e.edge, positions=["END"] if i % 2 else None)
                                    for i, e in enumerate(spec.edges)])
    pos_score = ev.evaluate(positional)
    out["positional.faithfulness"], out["positional.necessity"] = pos_score.faithfulness, pos_score.necessity
    mean = Evaluator(model, data, batch_size=3, ablation="mean", progress=False)
    out["mean.faithfulness"] = mean.evaluate(spec).faithfulness
    ev_kl = Evaluator(model, data, metric="kl", batch_size=3, progress=False)
    found = acdc(ev_kl, tau=0.02, progress=False)
    out["acdc"] = found.scores.nan_to_num().numpy()
    out["acdc.in_circuit"] = found.in_circuit.numpy().astype(float)
    out["acdc.n_trials"] = float(found.meta["n_trials"])
    return out


def _worker(rank: int, port: int, path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert dist.init("cpu") and dist.world_size() == WORLD
    try:
        model, data = _case()
        if rank == 1:  # less memory free here: both ranks must still cut the same batches (2, not 3)
            import importlib

            evaluator = importlib.import_module("circuitgraph.evaluate.evaluator")
            one = evaluator.Evaluator(model, data, batch_size=3, progress=False, distributed=False).pass_mb(1)
            evaluator.free_mb = lambda device: 5 * one
        res = _results(model, data)
        np.savez(f"{path}.{rank}.npz", **{k: np.asarray(v) for k, v in res.items()})
    finally:
        dist.close()


def _compare(one: dict, many: dict):
    assert one.keys() == many.keys()
    for k in one:
        np.testing.assert_allclose(np.asarray(many[k], dtype=float), np.asarray(one[k], dtype=float), rtol=0, atol=TOL,
                                   err_msg=k)


def test_two_ranks_equal_one_process(tmp_path):
    model, data = _case()
    one = _results(model, data)
    assert one["acdc.in_circuit"].sum() < one["eap"].astype(bool).sum()  # ACDC removed edges: decisions were taken
    ctx = mp.start_processes(_worker, args=(free_port(), str(tmp_path / "res")), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = 240
    import time

    t = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - t > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {deadline} s")
    for r in range(WORLD):
        with np.load(tmp_path / f"res.{r}.npz") as f:
            _compare(one, dict(f))  # every rank holds the one-process result


def test_shard_gives_every_rank_work(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    got = {}
    for r in range(4):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        got[r] = [s for _, s in dist.shard(10, 32)]
    assert all(got.values())  # 10 examples, batch 32, 4 ranks: the batch shrinks to 3
    covered = sorted(i for spans in got.values() for a, b in spans for i in range(a, b))
    assert covered == list(range(10))


@pytest.mark.slow
def test_torchrun_cli_equals_one_process(tmp_path, model_dir):
    from conftest import cli_alone_and_under_torchrun, random_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", random_rows(8, positions=False))
    args = ["discover", "--model", str(model_dir), "--data", str(data), "--method", "eap", "--top-n", "12",
            "--batch-size", "2", "--json"]
    one, many = cli_alone_and_under_torchrun(args, tmp_path)
    lines = [l for l in many.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints
    a, b = json.loads(one.stdout), json.loads(lines[0])
    assert b["faithfulness"] == pytest.approx(a["faithfulness"], abs=TOL)
    sa = json.loads((tmp_path / "one.json").read_text())["edge_scores"]
    sb = json.loads((tmp_path / "many.json").read_text())["edge_scores"]
    assert max(abs(sa[k] - sb[k]) for k in sa) < TOL
