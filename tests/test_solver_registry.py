"""A solver registered from outside the package runs through the CLI, a recipe and ``--stream``
with no edit anywhere else: the registry is the only place the rest of llmprune reads solvers
from (shared/ARCHITECTURE.md, issue 19)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from llmprune.cli import build_parser, main
from llmprune.core.masks import select_mask
from llmprune.recipe import PruneRecipe
from llmprune.solvers import SOLVERS, Solved, SolverBase, option, register


@dataclass
class KeepLargestPerRow(SolverBase):
    """Toy solver: keep the largest |w| of each row, scale the kept weights by ``scale``."""

    name = "toy-rowmag"
    help = "test solver: keeps the largest |w| in each row"
    needs_calibration = False
    scale: float = option(1.0, "factor applied to the kept weights")

    def new_stats(self, in_features, device):
        return None

    def solve_group(self, weights, stats, target, names):
        for w in weights:
            w = w.to(torch.float32)
            keep = select_mask(w.abs(), target, per_row=True)  # True = kept
            yield Solved((w * self.scale).masked_fill(~keep, 0.0), keep)


@pytest.fixture
def toy():
    register(KeepLargestPerRow)
    yield KeepLargestPerRow
    del SOLVERS[KeepLargestPerRow.name]


def _expected(w: torch.Tensor, sparsity: float, scale: float) -> torch.Tensor:
    """Independent reference: each row keeps its round((1 - s) * cols) largest |w|, scaled."""
    keep = round((1 - sparsity) * w.shape[1])
    idx = w.abs().topk(keep, dim=1).indices
    out = torch.zeros_like(w)
    return out.scatter(1, idx, w.gather(1, idx) * scale)


def _check(dense_dir, out_dir, sparsity: float, scale: float) -> None:
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    pruned = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    seen = 0
    for name, mod in dense.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            got = pruned.model.layers.get_submodule(name).weight
            want = _expected(mod.weight.detach(), sparsity, scale)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            seen += 1
    assert seen >= 7  # q, k, v, o, gate, up, down of every layer


def test_toy_solver_is_a_cli_command_with_its_option(toy):
    parser = build_parser()
    args = parser.parse_args(["toy-rowmag", "--model", "m", "--output", "o", "--sparsity",
                              "0.5", "--scale", "2"])
    assert args.method == "toy-rowmag" and args.scale == 2.0
    assert "toy-rowmag" in parser.format_help()
    assert PruneRecipe.from_stage("toy-rowmag", {"sparsity": 0.5, "scale": 2.0}).options == {
        "scale": 2.0}


def test_unregistered_solver_is_refused(capsys):
    assert main(["toy-rowmag", "--model", "m", "--output", "o"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["cli", "recipe", "stream"])
def test_toy_solver_runs_end_to_end(toy, how, checkpoint_dir, tmp_path):
    out = tmp_path / "out"
    if how == "recipe":
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump({"model": str(checkpoint_dir), "stages": [
            {"toy-rowmag": {"sparsity": 0.5, "scale": 2.0}}]}))
        assert main(["-q", "run", str(recipe), "--output", str(out)]) == 0
        # the recipe.yaml written beside the output spells the option out again
        stage = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["toy-rowmag"]
        assert stage["scale"] == 2.0
    else:
        extra = ["--stream"] if how == "stream" else []
        assert main(["-q", "toy-rowmag", "--model", str(checkpoint_dir), "--output", str(out),
                     "--sparsity", "0.5", "--scale", "2", *extra]) == 0
    _check(checkpoint_dir, out, 0.5, 2.0)
