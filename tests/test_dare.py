"""DARE: the drop and rescale against an independent computation, magnitude selection by hand,
and the merged model / compact delta round trip on tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmprune
from llmprune.cli import main
from llmprune.delta.dare import prune_delta, tensor_generator

from tests.conftest import tiny_model


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


def test_outputs_copy_the_tokenizer_but_no_other_weights(pair, tmp_path):
    """dare and merge copy the fine-tuned model's side files (tokenizer, generation config) and
    never a weights file of another format lying beside its safetensors."""
    import shutil

    base, tuned = pair
    tuned2 = tmp_path / "tuned"
    shutil.copytree(tuned, tuned2)
    (tuned2 / "pytorch_model.bin").write_bytes(b"stale weights of another format")
    side = {p.name for p in tuned.iterdir() if p.name.startswith("tokenizer")}
    assert side  # the fixture saved a tokenizer
    for argv, out in ((["dare", "--drop", "0.5"], tmp_path / "dare"),
                      (["merge", "--drop", "0.0"], tmp_path / "merge")):
        assert main(["-q", *argv, "--base", str(base), "--finetuned", str(tuned2),
                     "--output", str(out)]) == 0
        names = {p.name for p in out.iterdir()}
        assert side <= names and "pytorch_model.bin" not in names, names


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


# --- DAREx-q -------------------------------------------------------------------------------------


def _rank1_pair(p: float, seed: int = 0):
    """A tiny tuned model whose deltas are rank-1 (coherent, like real fine-tuning), and the
    pieces darex works on: base tensors, the dropped (un-rescaled) deltas and tuned tensors."""
    base = tiny_model("llama", seed=seed)
    tuned = tiny_model("llama", seed=seed)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, w in tuned.named_parameters():
            if w.dim() == 2 and "layers" in name:
                u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g)
                w.add_(0.05 * u @ v)
    sb, st = base.state_dict(), tuned.state_dict()
    names = [n for n in st if "layers" in n and st[n].dim() == 2]
    b = {n: sb[n].clone() for n in names}
    pruned = {n: (st[n] - sb[n]) * (torch.rand(st[n].shape, generator=g) >= p) for n in names}
    return tuned, b, pruned, {n: st[n].clone() for n in names}


def test_per_layer_q_is_the_least_squares_fit_of_each_linear_output(calib_ids):
    import numpy as np

    from llmprune.delta.darex import _per_layer_s

    p = 0.5
    tuned, b, pruned, t = _rank1_pair(p)
    got = _per_layer_s(tuned, b, pruned, t, p, calib_ids, progress=False)
    assert set(got) == set(pruned)
    # independent: capture each linear's inputs with our own hooks, solve min_s ||s a - y|| by lstsq
    xs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: xs.setdefault(n, []).append(i[0]))
             for n, m in tuned.named_modules() if f"{n}.weight" in pruned]
    with torch.no_grad():
        for i in range(0, calib_ids.shape[0], 4):
            tuned(input_ids=calib_ids[i: i + 4])
    for h in hooks:
        h.remove()
    inside = 0
    for n, chunks in xs.items():
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).double().numpy()
        a = (x @ pruned[f"{n}.weight"].double().numpy().T).reshape(-1, 1)
        y = (x @ (t[f"{n}.weight"] - b[f"{n}.weight"]).double().numpy().T).reshape(-1)
        s = float(np.linalg.lstsq(a, y, rcond=None)[0][0])
        want = min(max(s, 1.0), 1 / (1 - p))
        assert abs(got[f"{n}.weight"] - want) < 1e-4 * want, n
        inside += 1.0 < s < 1 / (1 - p)
    # coherent (rank-1) deltas put the optimum strictly between no rescale and DARE's
    assert inside >= len(xs) // 2


def test_darex_q_given_rescales_by_one_over_q(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "m"
    assert main(["-q", "dare", "--base", str(base), "--finetuned", str(tuned), "--drop", "0.9",
                 "--rescale", "darex-q", "--q", "0.25", "--output", str(out)]) == 0
    merged = load_file(out / "model.safetensors")
    b, t = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    for name, w in merged.items():
        kept = w != b[name]
        assert torch.allclose((w - b[name])[kept], ((t[name] - b[name]) / 0.25)[kept],
                              rtol=1e-4, atol=1e-6)


def _calib_loss(path, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(m(input_ids=ids, labels=ids).loss)


def test_darex_q_search_is_no_worse_than_dare_or_no_rescale(pair, tmp_path, text_file,
                                                             tokenizer):
    """The searched q's calibration loss, measured independently on the written model, is at
    most that of the grid's end points q = 1 - p (DARE) and q = 1 (no rescale)."""
    from llmprune.io.data import tokenize, windows

    base, tuned = pair
    args = ["-q", "dare", "--base", str(base), "--finetuned", str(tuned), "--drop", "0.9",
            "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32"]
    from llmprune.delta.dare import dare

    meta = dare(str(base), str(tuned), 0.9, "random", "darex-q", 0,
                              str(tmp_path / "s"), progress=False, calib_data=str(text_file),
                              nsamples=4, seqlen=32)
    q = meta["darex_q"]["q_global"]
    assert 0.1 - 1e-9 <= q <= 1.0
    assert main(args + ["--rescale", "dare", "--output", str(tmp_path / "d")]) == 0
    assert main(args + ["--rescale", "none", "--output", str(tmp_path / "n")]) == 0
    ids = windows(tokenize(tokenizer, text_file.read_text()), 4, 32)
    ls, ld, ln = (_calib_loss(tmp_path / k, ids) for k in "sdn")
    assert ls <= min(ld, ln) + 1e-5
    info = json.loads((tmp_path / "s" / "llmprune.json").read_text())
    assert info["dare"]["darex_q"]["q_global"] == q


def test_darex_q_bad_q_is_one_line(pair, tmp_path, capsys):
    base, tuned = pair
    assert main(["-q", "dare", "--base", str(base), "--finetuned", str(tuned), "--drop", "0.9",
                 "--rescale", "darex-q", "--q", "0.05", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--q must be in [1 - drop, 1]" in err
    assert not (tmp_path / "o").exists()
