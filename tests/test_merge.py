"""Merging task vectors: TIES on hand-computed cases, task arithmetic on tiny checkpoints against a
direct computation from the saved tensors, and the one-line errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmprune.cli import main
from llmprune.delta.merge import ties_merge, trim

from tests.conftest import tiny_model


def test_ties_by_hand_without_trim():
    t1 = torch.tensor([1.0, -2.0, 0.5, 0.0])
    t2 = torch.tensor([-3.0, -1.0, 0.2, 0.0])
    # elect: sign(t1 + t2) = [-, -, +, 0]; disjoint mean of the agreeing non-zero entries:
    # [-3 (t2 only), (-2 - 1) / 2, (0.5 + 0.2) / 2, 0]
    got = ties_merge([t1, t2], [1.0, 1.0], density=1.0)
    assert torch.allclose(got, torch.tensor([-3.0, -1.5, 0.35, 0.0]))


def test_ties_by_hand_with_trim_weights_and_lambda():
    t1 = torch.tensor([1.0, -2.0, 0.5, 0.1])
    t2 = torch.tensor([-3.0, -1.0, 0.2, 0.4])
    assert torch.equal(trim(t1, 0.5), torch.tensor([1.0, -2.0, 0.0, 0.0]))
    assert torch.equal(trim(t2, 0.5), torch.tensor([-3.0, -1.0, 0.0, 0.4]) * torch.tensor(
        [1.0, 1.0, 0.0, 0.0]))
    # weights 2 and 1: trimmed [2, -4, 0, 0] and [-3, -1, 0, 0]; signs of the sum [-1, -5] -> [-, -]
    # agreeing: entry 0 -> t2 only (-3); entry 1 -> both (-4 - 1) / 2; lambda 0.5 halves it
    got = ties_merge([t1, t2], [2.0, 1.0], density=0.5, lam=0.5)
    assert torch.allclose(got, torch.tensor([-1.5, -1.25, 0.0, 0.0]))


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("merge")
    tiny_model("llama", seed=0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for k in (1, 2):
        m = tiny_model("llama", seed=0)
        with torch.no_grad():
            g = torch.Generator().manual_seed(k)
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / f"ft{k}")
        tokenizer.save_pretrained(root / f"ft{k}")
    return root


def test_task_arithmetic_matches_the_saved_tensors(family, tmp_path):
    out = tmp_path / "ta"
    assert main(["-q", "merge", "--base", str(family / "base"), "--finetuned",
                 str(family / "ft1"), str(family / "ft2"), "--weights", "0.3", "0.7",
                 "--output", str(out)]) == 0
    b = load_file(family / "base" / "model.safetensors")
    f1, f2 = (load_file(family / f"ft{k}" / "model.safetensors") for k in (1, 2))
    got = load_file(out / "model.safetensors")
    assert set(got) == set(b)
    for n in b:
        want = b[n] + 0.3 * (f1[n] - b[n]) + 0.7 * (f2[n] - b[n])
        assert torch.allclose(got[n], want, atol=1e-6), n
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # a plain checkpoint


def test_ties_merge_of_checkpoints_elects_signs(family, tmp_path):
    out = tmp_path / "ties"
    assert main(["-q", "merge", "--base", str(family / "base"), "--finetuned",
                 str(family / "ft1"), str(family / "ft2"), "--method", "ties", "--density",
                 "1.0", "--output", str(out)]) == 0
    b = load_file(family / "base" / "model.safetensors")
    f1, f2 = (load_file(family / f"ft{k}" / "model.safetensors") for k in (1, 2))
    got = load_file(out / "model.safetensors")
    for n in b:
        d1, d2 = f1[n] - b[n], f2[n] - b[n]
        same = torch.sign(d1) == torch.sign(d2)
        # density 1: where the signs agree, the mean; where they differ, the larger one wins
        want = torch.where(same, (d1 + d2) / 2, torch.where(d1.abs() > d2.abs(), d1, d2))
        assert torch.allclose(got[n] - b[n], want, atol=1e-6), n


def test_merge_errors_are_one_line(family, tmp_path, capsys):
    args = ["-q", "merge", "--base", str(family / "base"), "--finetuned", str(family / "ft1"),
            str(family / "ft2")]
    assert main(args + ["--weights", "1", "--output", str(tmp_path / "a")]) == 2
    assert "one weight per checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(family / "ft2", bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:8]
    save_file(sd, str(bad / "model.safetensors"), {"format": "pt"})
    assert main(["-q", "merge", "--base", str(family / "base"), "--finetuned",
                 str(family / "ft1"), str(bad), "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.layers.0.self_attn.q_proj.weight" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
