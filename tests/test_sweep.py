"""`llmprune sweep` on a tiny model: the grid, the table, the JSON and real PNG files."""

from __future__ import annotations

import json

import pytest

from llmprune.cli import main


def test_sweep_writes_table_json_and_plots(checkpoint_dir, text_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["-q", "sweep", "--model", str(checkpoint_dir), "--solvers", "magnitude,wanda",
                 "--sparsity", "0.3,0.6", "--allocation", "uniform,owl", "--nsamples", "4",
                 "--seqlen", "32", "--calib-data", str(text_file), "--eval-ppl", str(text_file),
                 "--eval-seqlen", "32", "--max-windows", "2", "--output", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    runs = result["runs"]
    assert len(runs) == 2 * 2 * 2
    assert {(r["method"], r["allocation"], r["target"]) for r in runs} == {
        (m, a, t) for m in ("magnitude", "wanda") for a in ("uniform", "owl")
        for t in ("0.3", "0.6")}
    for r in runs:
        assert r["sparsity"] == pytest.approx(r["target_sparsity"], abs=1 / 64)
        assert r["perplexity"] > 1
        assert ("layer_sparsity" in r) == (r["allocation"] == "owl")
    table = (out / "sweep.md").read_text()
    assert table.count("\n| ") == 1 + 1 + len(runs)  # header, dense, runs
    for png in ("sweep.png", "owl_layers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # every run starts from the dense weights: a late run of the grid equals a separate
    # `llmprune wanda` + `llmprune eval` of the same recipe
    single = tmp_path / "single"
    assert main(["-q", "wanda", "--model", str(checkpoint_dir), "--sparsity", "0.6",
                 "--nsamples", "4", "--seqlen", "32", "--calib-data", str(text_file),
                 "--output", str(single)]) == 0
    capsys.readouterr()
    assert main(["-q", "eval", "--model", str(single), "--ppl", str(text_file), "--seqlen", "32",
                 "--max-windows", "2"]) == 0
    ppl = float(capsys.readouterr().out.strip().splitlines()[-1].split(":")[1])
    late = next(r for r in runs if (r["method"], r["allocation"], r["target"]) ==
                ("wanda", "uniform", "0.6"))
    assert late["perplexity"] == pytest.approx(ppl, abs=1e-4)


def test_sweep_bad_sparsity_is_one_line(checkpoint_dir, tmp_path, capsys):
    assert main(["-q", "sweep", "--model", str(checkpoint_dir), "--sparsity", "0.5,1.2",
                 "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1.2" in err
