"""Data-parallel calibration (llmprune.distributed) with 2 gloo processes on CPU, and
--device-map auto (llmprune.device_map) on its CPU degenerate path."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmprune
from llmprune import PruneRecipe
from llmprune.engine.calibrate import collect_layer_stats
from llmprune.engine.distributed import ShardedCalibration, shard_batches, shard_rows
from llmprune.core.errors import UserError
from llmprune.models import adapter_for

from tests.conftest import VOCAB, same_bits, tiny_model

METHODS = ("sparsegpt", "wanda")
BATCH = 3  # 10 rows -> batches of 3, 3, 3, 1: rank 0 gets rows 0-5, rank 1 rows 6-9


def _ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (10, 32), generator=g)


def _recipe(method: str) -> PruneRecipe:
    # one calibration pass of all 4 groups per layer, so each step records 4 statistics
    return PruneRecipe(method, sparsity=0.5, batch_size=BATCH, calib_dtype="fp32",
                       true_sequential=False)


class _Recording:
    """Wraps a parallel strategy (or none) and keeps a copy of every combined statistic."""

    def __init__(self, inner=None):
        self.inner, self.stats = inner, []
        self.is_main = True if inner is None else inner.is_main

    def adapt(self, solver, ids, opts):
        if self.inner is not None:
            solver, ids, opts = self.inner.adapt(solver, ids, opts)
        collect = opts.collect_stats or collect_layer_stats

        def recording(*args):
            out = collect(*args)
            self.stats.append([copy.deepcopy(s) for s in out])
            return out
        return solver, ids, opts.__class__(**{**vars(opts), "collect_stats": recording})


def _run(method: str, parallel=None, device_map=None) -> dict:
    model = tiny_model("llama")
    rec = _Recording(parallel)
    report = llmprune.prune(model, _recipe(method), calib_ids=_ids(), keep_masks=True,
                            progress=False, parallel=rec, device_map=device_map)
    masks = {n: report.pruned_mask(n) for n in report.masks}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "proj" in n}
    return {"stats": rec.stats, "masks": masks, "weights": weights}


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    """One of the 2 spawned processes (module level so that spawn can import it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from llmprune.engine.distributed import init_from_env

    par = init_from_env("cpu", "gloo", timeout_minutes=2)
    try:
        results = {m: _run(m, par) for m in METHODS}
    finally:
        par.close()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the children inherit it
    try:
        mp.start_processes(_rank_main, args=(2, _free_port(), str(out)), nprocs=2, join=True,
                           start_method="spawn")
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _hand_hessian_layer0(model) -> torch.Tensor:
    """X^T X of layer 0's q/k/v input over all calibration tokens, in float64, by hand."""
    with torch.no_grad():
        h = model.model.embed_tokens(_ids())
        x = model.model.layers[0].input_layernorm(h).reshape(-1, 64).double()
    return x.T @ x


@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_processes_match_one_process(two_processes, method):
    """Acceptance 3: 2 CPU processes (gloo) give the statistics and masks of one process."""
    r0, r1 = (res[method] for res in two_processes)
    emulated = _run(method, ShardedCalibration(2))
    plain = _run(method)
    n_steps = len(plain["stats"])
    assert n_steps == 2 and len(r0["stats"]) == len(r1["stats"]) == len(emulated["stats"]) == 2
    field = "h" if method == "sparsegpt" else "sq"
    for step in range(n_steps):
        for g in range(4):
            a, b = getattr(r0["stats"][step][g], field), getattr(r1["stats"][step][g], field)
            e = getattr(emulated["stats"][step][g], field)
            p = getattr(plain["stats"][step][g], field)
            # both ranks hold the combined statistics, bitwise those of the one-process
            # emulation of the same shards ...
            assert same_bits(a, b) and same_bits(a, e), (step, g)
            # ... and within float32 rounding of the plain one-process sum
            assert torch.allclose(a, p, rtol=1e-5, atol=1e-5 * float(p.abs().max())), (step, g)
            assert r0["stats"][step][g].tokens == plain["stats"][step][g].tokens == 10 * 32
    # an independent check of what is summed: layer 0's q/k/v Hessian by hand
    if method == "sparsegpt":
        expected = _hand_hessian_layer0(tiny_model("llama"))
        got = r0["stats"][0][0].full().double()
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert r0["masks"].keys() == plain["masks"].keys() and len(r0["masks"]) == 14
    for name in plain["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["masks"][name], emulated["masks"][name]), name
        assert torch.equal(r0["masks"][name], plain["masks"][name]), name
        assert 0.45 < float(r0["masks"][name].float().mean()) < 0.55
    for name in plain["weights"]:
        assert same_bits(r0["weights"][name], r1["weights"][name]), name  # broadcast from rank 0
        assert same_bits(r0["weights"][name], emulated["weights"][name]), name
        if method == "wanda":  # Wanda keeps the dense values: equal masks, equal weights
            assert same_bits(r0["weights"][name], plain["weights"][name]), name
        else:
            assert torch.allclose(r0["weights"][name], plain["weights"][name], atol=1e-4)


def test_shards_are_contiguous_batches():
    # 4 batches over 2 ranks: 2 each; 5 over 2: 2 and 3; 10 rows in batches of 3 (3,3,3,1)
    assert [list(shard_batches(4, r, 2)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(shard_batches(5, r, 2)) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert [shard_rows(10, 3, r, 2) for r in range(2)] == [slice(0, 6), slice(6, 10)]
    with pytest.raises(UserError, match="cannot be split over 3 processes"):
        shard_rows(8, 4, 0, 3)  # 2 batches, 3 ranks


def test_distributed_without_torchrun_is_one_line(checkpoint_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "llmprune", "wanda", "--model", str(checkpoint_dir),
         "--sparsity", "0.5", "--output", str(tmp_path / "out"), "--distributed"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "torchrun" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", METHODS)
def test_device_map_auto_on_cpu_is_the_plain_run(method):
    """Without CUDA, --device-map auto degrades to the CPU with bitwise the same result."""
    plain, mapped = _run(method), _run(method, device_map="auto")
    for name in plain["weights"]:
        assert same_bits(plain["weights"][name], mapped["weights"][name]), name


def test_split_layer_hooks_give_the_same_result(monkeypatch):
    """A layer split into several placed parts (all on the CPU here: the hooks that move inputs
    in and outputs back are exercised, the device copies are no-ops) prunes exactly as the
    unsplit layer, and the hooks are gone afterwards."""
    import llmprune.engine.device_map as dm

    plan = {"self_attn.q_proj": "cpu", "self_attn.k_proj": "cpu", "self_attn.v_proj": "cpu",
            "self_attn.o_proj": "cpu", "mlp": "cpu", "input_layernorm": "cpu",
            "post_attention_layernorm": "cpu"}
    placement = dm.LayerPlacement(main=torch.device("cpu"), use_gpus=False, plan=plan)
    hooks_while_placed = []
    place = placement.place

    def counting_place(layer):
        place(layer)
        hooks_while_placed.append(sum(len(m._forward_pre_hooks) + len(m._forward_hooks)
                                      for m in layer.modules()))
    monkeypatch.setattr(placement, "place", counting_place)
    monkeypatch.setattr(dm, "layer_placement", lambda *a, **k: placement)
    model = tiny_model("llama")
    report = llmprune.prune(model, _recipe("sparsegpt"), calib_ids=_ids(), progress=False,
                            device_map="auto")
    assert hooks_while_placed == [14, 14]  # 7 placed parts x (pre-hook, post-hook), per layer
    for layer in adapter_for(model).layers(model):
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in layer.modules())
    plain = _run("sparsegpt")
    for n, p in model.named_parameters():
        if "proj" in n:
            assert same_bits(p.detach(), plain["weights"][n]), n
    assert report.sparsity == pytest.approx(0.5, abs=0.01)


def test_bad_device_map_is_a_user_error():
    with pytest.raises(UserError, match="--device-map must be 'auto'"):
        llmprune.prune(tiny_model("llama"), _recipe("wanda"), calib_ids=_ids(), progress=False,
                       device_map="balanced")


def test_device_map_plan_splits_a_layer_that_one_gpu_cannot_hold():
    """The planner (accelerate, with our max_memory) spreads a layer over two GPUs when one
    cannot hold it; a layer that fits nowhere is one clear error. No GPU is touched."""
    from llmprune.engine.device_map import LayerPlacement

    layer = tiny_model("llama").model.layers[0]
    size = sum(p.numel() * 4 for p in layer.parameters())
    plan = LayerPlacement(torch.device("cuda:0"), use_gpus=True,
                          max_memory={0: size // 2, 1: size // 2, "cpu": 10 * size}
                          ).plan_for(layer)
    assert {0, 1} <= set(plan.values())
    with pytest.raises(UserError, match="does not fit"):
        LayerPlacement(torch.device("cuda:0"), use_gpus=True,
                       max_memory={0: size // 4}).plan_for(layer)
