"""The pure helpers of eval/bench_experts.py (the benchmark itself trains a model for minutes)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "bench_experts.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_experts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_valid_cuts_at_the_line_boundary_nearest_the_fraction(bench):
    text = "".join(f"line {i:02d}\n" for i in range(10))  # 10 lines of 8 characters
    train, held = bench.split_valid(text, 0.9)
    assert train + held == text and train.endswith("\n")
    assert train.count("\n") == 9 and held == "line 09\n"
    train, held = bench.split_valid(text, 0.33)  # cut at character 26: the nearest line end is 24
    assert len(train) == 24


def test_random_keep_is_seeded_distinct_and_sorted(bench):
    a = bench.random_keep(4, 8, 3, seed=7)
    assert [t.tolist() for t in a] == [t.tolist() for t in bench.random_keep(4, 8, 3, seed=7)]
    for t in a:
        assert t.numel() == 3 and len(set(t.tolist())) == 3
        assert torch.equal(t, t.sort().values) and 0 <= int(t.min()) and int(t.max()) < 8


def test_median_row_takes_the_median_and_range_per_slice(bench):
    draws = [{"experts_after": 4, "seconds": s, "ppl": {"A": a, "B": b}}
             for s, a, b in [(1.0, 10.0, 30.0), (2.0, 20.0, 10.0), (3.0, 30.0, 20.0)]]
    row = bench.median_row(draws)
    assert row["ppl"] == {"A": 20.0, "B": 20.0}
    assert row["ppl_range"] == {"A": [10.0, 30.0], "B": [10.0, 30.0]}
    assert row["seconds"] == 2.0 and row["experts_after"] == 4 and row["draws"] is draws


def test_lr_warms_up_then_decays_to_the_floor(bench):
    steps, base = 100, bench.OPTIM["lr"]
    warm = bench.OPTIM["warmup"]
    assert bench.lr_at(0, steps) == pytest.approx(base / warm)
    assert bench.lr_at(warm, steps) == pytest.approx(base)
    assert bench.lr_at(steps, steps) == pytest.approx(base * bench.OPTIM["final_lr_fraction"])
