"""DARE: the drop and rescale against an independent computation, magnitude selection by hand,
and the merged model / compact delta round trip on tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmprune
from llmprune.cli import main
from llmprune.dare import prune_delta, tensor_generator

from .conftest import tiny_model


def test_random_drop_and_rescale_match_bernoulli_by_hand():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, 32, generator=gen)
    tuned = base + 0.01 * torch.randn(64, 32, generator=gen)
    d, keep = prune_delta(base, tuned, 0.9, "random", "dare", torch.Generator().manual_seed(7))
    u = torch.rand(64, 32, generator=torch.Generator().manual_seed(7))  # the same draws
    want_keep = u >= 0.9  # dropped with probability p = 0.9
    assert torch.equal(keep, want_keep)
    want = torch.where(want_keep, (tuned - base) / (1 - 0.9), torch.zeros(()))
    assert torch.allclose(d, want, rtol=1e-6, atol=0)
    assert 0.05 < keep.float().mean() < 0.15
    d0, _ = prune_delta(base, tuned, 0.9, "random", "none", torch.Generator().manual_seed(7))
    assert torch.allclose(d0[want_keep], (tuned - base)[want_keep])


def test_magnitude_keeps_the_largest_deltas_exactly():
    base = torch.zeros(2, 5)
    tuned = torch.tensor([[0.1, -3.0, 0.2, 2.0, -0.05], [1.0, 0.0, -0.3, 0.4, 5.0]])
    d, keep = prune_delta(base, tuned, 0.7, "magnitude", "none", torch.Generator())
    # 10 deltas, drop round(7) -> keep the 3 largest |d|: -3.0, 2.0, 5.0
    assert keep.sum() == 3 and set(d[keep].tolist()) == {-3.0, 2.0, 5.0}


def test_seeding_is_per_tensor_name():
    a = torch.rand(5, generator=tensor_generator(0, "x"))
    b = torch.rand(5, generator=tensor_generator(0, "x"))
    c = torch.rand(5, generator=tensor_generator(0, "y"))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("dare")
    base = tiny_model("llama", seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    tuned = tiny_model("llama", seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in tuned.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    tuned.save_pretrained(root / "tuned")
    tokenizer.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def test_merged_model_and_compact_delta_reconstruct_bit_exactly(pair, tmp_path):
    base, tuned = pair
    out, delta = tmp_path / "merged", tmp_path / "delta"
    assert main(["-q", "dare", "--base", str(base), "--finetuned", str(tuned), "--drop", "0.9",
                 "--output", str(out), "--delta-output", str(delta)]) == 0
    merged = load_file(out / "model.safetensors")
    b, t = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    for name, w in merged.items():
        kept = (w != b[name])
        assert 0.03 < kept.float().mean() < 0.2, name  # about 10% of the deltas survive
        # surviving entries carry the rescaled delta
        assert torch.allclose((w - b[name])[kept], ((t[name] - b[name]) / 0.1)[kept],
                              rtol=1e-4, atol=1e-6)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out).state_dict()
    rebuilt = llmprune.load_pretrained(delta, base=str(base)).state_dict()
    for name, w in merged.items():
        assert torch.equal(rebuilt[name], w) and torch.equal(plain[name], w), name
    meta = json.loads((delta / "llmprune.json").read_text())
    assert meta["delta_of"]["drop"] == 0.9
    full = sum(v.numel() * v.element_size() for v in t.values())
    assert meta["totals"]["tensor_bytes"] < 0.3 * full  # 10% values + 1-bit masks
    with pytest.raises(llmprune.UserError, match="base="):
        llmprune.load_pretrained(delta)


def test_mismatched_pair_is_one_line(pair, tmp_path, capsys, tokenizer):
    base, tuned = pair
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(tuned, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:64]
    save_file(sd, str(bad / "model.safetensors"), {"format": "pt"})
    assert main(["-q", "dare", "--base", str(base), "--finetuned", str(bad), "--drop", "0.5",
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.layers.1.mlp.up_proj.weight" in err
    assert not (tmp_path / "o").exists()
