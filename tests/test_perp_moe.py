"""PERP on pruned mixtures of experts (``llmprune perp`` on a sparsegpt output).

The pruning run names each expert's mask ``<experts>.expert_linears.<param>.<e>``; PERP keeps the
fused experts frozen and trains adapters, norms and biases elsewhere. The checks read the masks
file with safetensors and unpack its bits with numpy here, and index the fused parameters in each
family's own layout (``[experts, out, in]``; gpt-oss ``[experts, in, out]``) by hand.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmprune.cli import main

from .tiny_families import VOCAB, tiny_family_model

EXPERT_KEY = re.compile(r"^(.*)\.expert_linears\.([A-Za-z_]+)\.(\d+)\.weight$")
TRANSPOSED = {"gpt_oss"}  # families storing experts [experts, in, out]


def _read_masks(path) -> dict[str, np.ndarray]:
    with safe_open(str(path / "llmprune_masks.safetensors"), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _keep(bits: np.ndarray, width: int) -> torch.Tensor:
    """Packed little-endian keep bits [out, ceil(in / 8)] -> bool [out, in]."""
    return torch.from_numpy(np.unpackbits(bits, axis=-1, bitorder="little")[:, :width] == 1)


def _weight(state: dict, key: str, model_type: str) -> torch.Tensor:
    """The [out, in] weight a mask key names: a linear's, or expert e's slice of the fused
    parameter in the family's own layout."""
    m = EXPERT_KEY.match(key)
    if m is None:
        return state[key]
    w = state[f"{m[1]}.{m[2]}"][int(m[3])]
    return w.T if model_type in TRANSPOSED else w


def _lm_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer, text_file):
    """model type -> (dense dir, sparsegpt 50% output dir), made once per type."""
    made = {}

    def make(model_type):
        if model_type not in made:
            root = tmp_path_factory.mktemp(model_type)
            tiny_family_model(model_type).save_pretrained(root / "dense")
            tokenizer.save_pretrained(root / "dense")
            assert main(["-q", "sparsegpt", "--model", str(root / "dense"), "--sparsity", "0.5",
                         "--calib-data", str(text_file), "--nsamples", "8", "--seqlen", "32",
                         "--output", str(root / "pruned")]) == 0
            made[model_type] = root / "dense", root / "pruned"
        return made[model_type]
    return make


def _perp(src, out, text_file, steps=16):
    return main(["-q", "perp", "--model", str(src), "--train", "norms,biases,lora", "--steps",
                 str(steps), "--lr", "1e-2", "--batch-size", "2", "--seqlen", "32",
                 "--nsamples", "8", "--calib-data", str(text_file), "--output", str(out)])


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_perp_on_moe_keeps_every_zero_and_lowers_the_loss(model_type, pruned, tokenizer,
                                                            text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    _, src = pruned(model_type)
    out = tmp_path / "perp"
    assert _perp(src, out, text_file) == 0

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    before = AutoModelForCausalLM.from_pretrained(src)
    a, b = before.state_dict(), model.state_dict()
    masks = _read_masks(src)
    assert any(EXPERT_KEY.match(k) for k in masks)
    assert masks.keys() == _read_masks(out).keys()
    trained = 0
    for key, bits in masks.items():
        w0, w1 = _weight(a, key, model_type), _weight(b, key, model_type)
        keep = _keep(bits, w0.shape[1])
        assert keep.shape == w1.shape, key
        assert torch.equal(w1 == 0, ~keep), key  # zeros exactly where pruned (random kept ones)
        if EXPERT_KEY.match(key):
            assert torch.equal(w1, w0), key  # experts frozen
        else:
            trained += not torch.equal(w1, w0)
    linears = [k for k in masks if not EXPERT_KEY.match(k)]
    assert trained == len(linears)  # an adapter on every pruned non-expert linear
    routers = [k for k in b if ("router" in k or ".gate." in k) and k.endswith("weight")
               and b[k].dim() == 2 and b[k].shape[0] == 4]
    assert routers and all(torch.equal(b[k], a[k]) for k in routers)

    perp = json.loads((out / "llmprune.json").read_text())["perp"]
    assert perp["sparsity_checked"] == len(masks)
    assert perp["loss_last"] < perp["loss_first"]
    ids = tokenizer((text_file.read_text())[:4000], return_tensors="pt").input_ids[:, :256]
    ids = ids.reshape(-1, 32)[:8]
    assert (ids < VOCAB).all()
    assert _lm_loss(model, ids) < _lm_loss(before, ids)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids[:1]).logits).all()


def _rewrite_masks(src, dst_file, edit) -> None:
    masks = {k: torch.from_numpy(v) for k, v in _read_masks(src).items()}
    with safe_open(str(src / "llmprune_masks.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file(edit(masks), str(dst_file), meta)


@pytest.mark.parametrize("edit, said", [
    (lambda m: {**m, "model.layers.0.mlp.experts.expert_linears.gate_up_proj.9.weight":
                m["model.layers.0.mlp.experts.expert_linears.gate_up_proj.0.weight"].clone()},
     "not an expert of a fused expert parameter of this model"),
    (lambda m: {**m, "model.layers.0.mlp.experts.expert_linears.down_proj.1.weight":
                m["model.layers.0.mlp.experts.expert_linears.gate_up_proj.0.weight"].clone()},
     "packed bytes, not those of this model's weight"),
])
def test_perp_refuses_expert_masks_of_another_model(edit, said, pruned, text_file, tmp_path,
                                                    capsys):
    import shutil

    _, src = pruned("mixtral")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    _rewrite_masks(src, bad / "llmprune_masks.safetensors", edit)
    assert _perp(bad, tmp_path / "out", text_file, steps=1) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and "another model" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
