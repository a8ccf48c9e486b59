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


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_perp_trains_experts_with_train_experts(model_type, pruned, text_file, tmp_path):
    """``--train norms,lora,experts``: every pruned expert is trained (its kept weights change),
    its zeros stay exactly where the masks file says, routers are unchanged, the loss falls."""
    from transformers import AutoModelForCausalLM

    _, src = pruned(model_type)
    out = tmp_path / "perp"
    assert main(["-q", "perp", "--model", str(src), "--train", "norms,lora,experts", "--steps",
                 "12", "--lr", "1e-2", "--batch-size", "2", "--seqlen", "32", "--nsamples", "8",
                 "--calib-data", str(text_file), "--output", str(out)]) == 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    a = AutoModelForCausalLM.from_pretrained(src).state_dict()
    b = model.state_dict()
    masks = _read_masks(src)
    experts = [k for k in masks if EXPERT_KEY.match(k)]
    assert experts
    for key in masks:
        w0, w1 = _weight(a, key, model_type), _weight(b, key, model_type)
        keep = _keep(masks[key], w0.shape[1])
        assert torch.equal(w1 == 0, ~keep), key
        assert not torch.equal(w1, w0), key  # every pruned linear and expert trained
    routers = [k for k in b if ("router" in k or ".gate." in k) and k.endswith("weight")
               and b[k].dim() == 2 and b[k].shape[0] == 4]
    assert routers and all(torch.equal(b[k], a[k]) for k in routers)
    perp = json.loads((out / "llmprune.json").read_text())["perp"]
    assert perp["trainable_by_kind"]["experts"] > 0
    assert perp["sparsity_checked"] == len(masks)
    assert perp["loss_last"] < perp["loss_first"]


@pytest.mark.parametrize("variant", ["masklora", "scalelora"])
@pytest.mark.parametrize("transposed", [False, True])
def test_expert_adapter_is_each_experts_formula(variant, transposed):
    """The adapter of a fused parameter [E, out, in] (transposed: [E, in, out]) equals, expert by
    expert, PERP's formula computed here in float64 with a plain matrix product:
    MaskLoRA W_e + (alpha / r) (B_e A_e) * M_e, ScaleLoRA (B_e A_e) * W_e; pruned stays 0."""
    from llmprune.retrain.perp_experts import ExpertAdapter

    g = torch.Generator().manual_seed(0)
    E, out, inp, r = 3, 6, 10, 2
    keep = torch.rand(E, out, inp, generator=g) > 0.5
    w = torch.randn(E, out, inp, generator=g) * keep
    ad = ExpertAdapter(keep, r, 4.0, variant, transposed, torch.float32)
    with torch.no_grad():  # away from the identity init, so the formula is exercised
        ad.lora_A.copy_(torch.randn(E, r, inp, generator=g))
        ad.lora_B.copy_(torch.randn(E, out, r, generator=g))
    got = ad(w.transpose(1, 2).contiguous() if transposed else w)
    got = got.transpose(1, 2) if transposed else got
    for e in range(E):
        ba = ad.lora_B[e].double().detach() @ ad.lora_A[e].double().detach()
        we = w[e].double()
        want = we + 2.0 * ba * keep[e] if variant == "masklora" else ba * we
        torch.testing.assert_close(got[e].double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[e] == 0, (w[e] == 0) | ~keep[e]) or variant == "masklora"
        assert (got[e][~keep[e]] == 0).all()


def test_expert_adapters_train_the_model_that_is_merged():
    """Logits with the expert adapters active (training's forward) equal the merged model's; the
    merge leaves plain fused parameters (no parametrisation left)."""
    from torch.nn.utils import parametrize

    import llmprune
    from llmprune.retrain.perp_experts import (adapters_active, add_expert_adapters,
                                               merge_expert_adapters)
    from llmprune.retrain.perp_masks import bool_masks

    model = tiny_family_model("mixtral")
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    report = llmprune.prune(model, llmprune.PruneRecipe(method="magnitude", sparsity=0.5),
                            progress=False, keep_masks=True)
    keep = bool_masks(model, report.masks)
    params = add_expert_adapters(model, keep, 2, 4.0, "masklora")
    assert len(params) == 2 * 2 * 2  # (A, B) of gate_up and of down, in each of 2 layers
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
        with adapters_active(model):
            active = model(input_ids=ids).logits
        merge_expert_adapters(model)
        merged = model(input_ids=ids).logits
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(merged, active, rtol=1e-5, atol=1e-5)
