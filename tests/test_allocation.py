"""OWL allocation: the formula by hand, outlier ratios against an independent computation with
hooks on the whole dense model, and the global average of a real run."""

from __future__ import annotations

import json

import pytest
import torch

from llmprune.engine.allocation import outlier_ratios, owl_sparsities
from llmprune.engine.calibrate import EngineOptions
from llmprune.cli import main
from llmprune.models import adapter_for

from tests.conftest import tiny_model


def test_owl_formula_hand_case():
    # densities span 2 * lambda linearly in LOD, centred on 1 - target
    assert owl_sparsities([0.0, 0.5, 1.0], [10, 10, 10], 0.5, 0.1) == pytest.approx(
        [0.6, 0.5, 0.4], abs=1e-12)


@pytest.mark.parametrize("target,lam", [(0.7, 0.08), (0.5, 0.2), (0.3, 0.0)])
def test_owl_weighted_mean_is_exact(target, lam):
    gen = torch.Generator().manual_seed(0)
    lod = torch.rand(12, generator=gen).tolist()
    sizes = torch.randint(100, 1000, (12,), generator=gen).tolist()
    s = owl_sparsities(lod, sizes, target, lam)
    mean = sum(a * b for a, b in zip(s, sizes)) / sum(sizes)
    assert mean == pytest.approx(target, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-12)
    order = sorted(range(12), key=lambda i: lod[i])  # more outliers -> less pruned
    assert all(s[order[k]] >= s[order[k + 1]] - 1e-12 for k in range(11))


@torch.no_grad()
def test_outlier_ratios_match_hooks_on_the_dense_model(calib_ids):
    model = tiny_model("llama", seed=5)
    # independent: one full forward of the unmodified model, inputs of every linear by hooks
    sq, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            def pre(m, args, _n=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[_n] = sq.get(_n, 0) + (x * x).sum(0)
            hooks.append(mod.register_forward_pre_hook(pre))
    model(input_ids=calib_ids, use_cache=False)
    for h in hooks:
        h.remove()
    want = []
    for i, layer in enumerate(model.model.layers):
        scores = [(mod.weight.double().abs() * sq[f"model.layers.{i}.{n}"].sqrt()).flatten()
                  for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)]
        flat = torch.cat(scores)
        want.append(float((flat > 5 * flat.mean()).double().mean()))

    got, sizes = outlier_ratios(model, adapter_for(model), calib_ids, 5.0, EngineOptions())
    assert got == pytest.approx(want, abs=2e-3)  # float32 vs float64 at the threshold
    assert sizes == [sum(m.weight.numel() for m in layer.modules()
                         if isinstance(m, torch.nn.Linear)) for layer in model.model.layers]


def test_owl_run_keeps_the_global_average(checkpoint_dir, text_file, tmp_path):
    out = tmp_path / "owl"
    assert main(["-q", "wanda", "--model", str(checkpoint_dir), "--sparsity", "0.7",
                 "--allocation", "owl", "--owl-lambda", "0.1", "--calib-data", str(text_file),
                 "--nsamples", "4", "--seqlen", "32", "--output", str(out)]) == 0
    meta = json.loads((out / "llmprune.json").read_text())
    alloc = meta["allocation"]
    assert alloc["method"] == "owl" and len(alloc["layer_sparsity"]) == 2
    assert alloc["layer_sparsity"][0] != pytest.approx(alloc["layer_sparsity"][1])
    # measured: every row prunes round(in * s_l), so the global average is exact to rounding
    assert meta["sparsity"] == pytest.approx(0.7, abs=1.0 / 64)
    for name, info in meta["layers"].items():
        i = int(name.split(".")[2])
        assert info["sparsity"] == pytest.approx(alloc["layer_sparsity"][i], abs=1.0 / 64)


def test_owl_with_nm_is_one_line(checkpoint_dir, tmp_path, capsys):
    assert main(["-q", "wanda", "--model", str(checkpoint_dir), "--pattern", "2:4",
                 "--allocation", "owl", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "N:M" in err and not (tmp_path / "x").exists()
