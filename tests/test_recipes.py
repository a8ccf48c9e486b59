"""YAML recipes: validation with suggestions, --set, the shipped recipes, and bit-exact
reproduction from the recipe.yaml every run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from llmprune import runner
from llmprune.cli import main

from tests.conftest import same_bits

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))


def test_shipped_recipes_are_valid():
    assert len(RECIPES) >= 5
    for path in RECIPES:
        data = runner.load(str(path))
        assert next(iter(data["stages"][0])) in ("magnitude", "wanda", "sparsegpt", "admm")


@pytest.mark.parametrize("text,hint", [
    ("model: m\nstages:\n  - sparsegpt: {nsample: 4}\n", "did you mean 'nsamples'"),
    ("model: m\nstages:\n  - sparsgpt: {}\n", "did you mean 'sparsegpt'"),
    ("model: m\nstages:\n  - wanda: {}\n  - export: {formt: compact}\n", "did you mean 'format'"),
    ("model: m\nstagse: []\n", "did you mean 'stages'"),
    ("model: m\nstages:\n  - export: {}\n", "exactly one solver stage"),
])
def test_unknown_keys_are_refused_with_a_hint(tmp_path, capsys, text, hint):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert main(["-q", "run", str(path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and hint in err and not (tmp_path / "o").exists()


def test_set_overrides(tmp_path):
    solver = next(iter(runner.load(str(RECIPES[0]))["stages"][0]))
    data = runner.load(str(RECIPES[0]), ["model=./x", f"{solver}.seed=7"])
    assert data["model"] == "./x"
    assert next(iter(data["stages"][0].values()))["seed"] == 7
    with pytest.raises(Exception, match="no stage"):
        runner.load(str(RECIPES[0]), ["perp.steps=3"])


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


def test_cli_run_writes_a_recipe_that_reproduces_it(checkpoint_dir, text_file, tmp_path):
    first = tmp_path / "first"
    assert main(["-q", "sparsegpt", "--model", str(checkpoint_dir), "--pattern", "2:4",
                 "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32",
                 "--calib-sampling", "random", "--seed", "3", "--output", str(first)]) == 0
    written = yaml.safe_load((first / "recipe.yaml").read_text())
    assert written["model"] == str(checkpoint_dir)
    stage = written["stages"][0]["sparsegpt"]
    assert stage["pattern"] == "2:4" and stage["seed"] == 3 and stage["nsamples"] == 4

    again = tmp_path / "again"
    assert main(["-q", "run", str(first / "recipe.yaml"), "--output", str(again)]) == 0
    a, b = _tensors(first), _tensors(again)
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    assert (again / "recipe.yaml").read_text() == (first / "recipe.yaml").read_text()


def test_recipe_with_export_and_eval(checkpoint_dir, text_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(checkpoint_dir), "stages": [
        {"wanda": {"sparsity": 0.5, "nsamples": 4, "seqlen": 32, "calib_data": str(text_file)}},
        {"export": {"format": "compact", "dtype": "bf16"}},
        {"eval": {"ppl": str(text_file), "seqlen": 32, "max_windows": 2}}]}))
    out = tmp_path / "out"
    assert main(["-q", "run", str(recipe), "--output", str(out)]) == 0
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["format"] == "llmprune-compact" and meta["dtype"] == "bfloat16"
    assert any(k.startswith("perplexity/") for k in meta["evaluations"])
    stages = yaml.safe_load((out / "recipe.yaml").read_text())["stages"]
    assert [next(iter(s)) for s in stages] == ["wanda", "export", "eval"]


@pytest.mark.real_model
def test_smollm2_2of4_recipe_end_to_end_and_reproducible(tmp_path):
    from llmprune.io.compact_reader import iter_compact

    recipe = Path(__file__).parents[1] / "recipes" / "smollm2-135m" / "sparsegpt-2of4.yaml"
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["-q", "run", str(recipe), "--set", "eval.max_windows=2",
                 "--output", str(first)]) == 0
    assert main(["-q", "run", str(first / "recipe.yaml"), "--output", str(again)]) == 0
    a = {n: t for n, t, _ in iter_compact(first)}
    b = {n: t for n, t, _ in iter_compact(again)}
    assert a.keys() == b.keys()
    assert all(same_bits(a[k], b[k]) for k in a)
    meta = json.loads((first / "llmprune.json").read_text())
    ppl = next(v for k, v in meta["evaluations"].items() if k.startswith("perplexity/"))
    assert ppl["value"] < 80  # 2:4 SparseGPT on 2 windows; dense is about 20


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bf16_fast", [True, False])
def test_recipe_yaml_spells_out_the_auto_calib_dtype(tmp_path, checkpoint_dir, text_file,
                                                     monkeypatch, bf16_fast, stream):
    """`--calib-dtype auto` means bf16 passes for SparseGPT only where bf16 is fast, so the same
    flags give different weights on different CPUs. The recipe.yaml written next to the result
    names the dtype that was used, so rerunning it on another machine repeats the result."""
    import llmprune.engine.prune as engine_prune

    monkeypatch.setattr(engine_prune, "bf16_is_fast", lambda device: bf16_fast)
    out = tmp_path / "out"
    assert main(["-q", "sparsegpt", "--model", str(checkpoint_dir), "--sparsity", "0.5",
                 "--nsamples", "4", "--seqlen", "16", "--calib-data", str(text_file),
                 "--output", str(out)] + (["--stream"] if stream else [])) == 0
    meta = json.loads((out / "llmprune.json").read_text())
    assert ("streaming" in meta) == stream
    solver = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["sparsegpt"]
    want = "bf16" if bf16_fast else "fp32"
    assert meta["recipe"]["calib_dtype"] == "auto"  # what was asked
    assert solver["calib_dtype"] == want == meta["recipe_resolved"]["calib_dtype"]
    assert meta["calibration"]["forward_dtype"] == {"bf16": "torch.bfloat16",
                                                    "fp32": "torch.float32"}[want]
