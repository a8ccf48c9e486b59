"""Structured pruning: groups, masked / zero_ / shrink_, select, export and the one-shot baseline.

References are independent of llmprune.structured: models built by transformers from smaller
configs with weights copied by hand, hand-zeroed projections, hand-counted parameters and a hand
recomputation of attention heads' outputs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llmprune.structured import format as FMT, selection as SEL, shrink as S
from llmprune.cli import main
from llmprune.core.errors import UserError
from tests.conftest import VOCAB, random_text, tiny_config

HIDDEN, HEADS, KV, HEAD_DIM, INTER, LAYERS = 64, 8, 2, 8, 128, 2


def gqa_config(**over):
    """Llama with GQA: 8 query heads of dim 8 in 2 KV groups of 4."""
    from transformers import LlamaConfig

    kw = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              num_key_value_heads=KV, intermediate_size=INTER, vocab_size=VOCAB,
              max_position_embeddings=256)
    kw.update(over)
    return LlamaConfig(**kw)


def build(config, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # random (not default-initialised) biases so that OPT / Qwen2 biases matter in every check
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def model_of(family, seed=0):
    if family == "llama-gqa":
        return build(gqa_config(), seed)
    return build(tiny_config(family), seed)


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def random_scores(groups, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"heads": torch.rand(g.n_heads, generator=gen),
             "mlp": torch.rand(g.n_channels, generator=gen)} for g in groups]


# ----------------------------------------------------------------------------- groups
def test_layer_groups_hand_counts():
    g = S.layer_groups(model_of("llama-gqa"))
    # q rows + o columns of one head: 8*64 + 64*8; k + v rows of one KV head: 2 * 8*64;
    # gate + up rows and down column of one channel: 3 * 64
    assert g == [S.LayerGroups(8, 2, 8, 128, 1024, 1024, 192, 0)] * 2
    assert g[0].total_params == 8 * 1024 + 2 * 1024 + 128 * 192

    opt = model_of("opt")
    g = S.layer_groups(opt)
    # OPT: 4 heads of 16; q row block + bias + out_proj columns; k, v rows + biases;
    # fc1 row + bias + fc2 column; out_proj and fc2 biases belong to no group
    assert g[0] == S.LayerGroups(4, 4, 16, 128, 16 * 65 + 64 * 16, 2 * 16 * 65, 64 + 1 + 64, 128)
    layer = opt.model.decoder.layers[0]
    n = sum(p.numel() for name, p in layer.named_parameters() if "layer_norm" not in name)
    assert g[0].total_params == n


# ----------------------------------------------------------------------------- masked == zero_ == shrink_
@pytest.mark.parametrize("family", ["llama-gqa", "opt", "qwen2"])
@pytest.mark.parametrize("gqa", ["even", "kv"])
@pytest.mark.parametrize("uniform", [True, False])
def test_masked_zero_shrink_same_logits(family, gqa, uniform):
    model = model_of(family)
    dense = logits(model)
    groups = S.layer_groups(model)
    for seed in range(2):
        mask = SEL.select(random_scores(groups, seed), groups, sparsity=0.4, uniform=uniform,
                        gqa=gqa)
        with S.masked(model, mask):
            a = logits(model)
        assert not torch.allclose(a, dense, atol=1e-3)  # the mask does something
        assert torch.equal(logits(model), dense)  # hooks are gone after the block
        zeroed = copy.deepcopy(model)
        S.zero_(zeroed, mask)
        shrunk = copy.deepcopy(model)
        S.shrink_(shrunk, mask)
        torch.testing.assert_close(logits(zeroed), a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(shrunk), a, atol=1e-5, rtol=1e-5)
        # the shrunk model really is smaller, by exactly the counted parameters
        n_before = sum(p.numel() for p in model.parameters())
        n_after = sum(p.numel() for p in shrunk.parameters())
        assert n_before - n_after == S.removed_params(groups, mask)
        # and decodes with its KV cache like the masked model
        out = shrunk.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False)
        with S.masked(model, mask):
            ref = model.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False)
        assert torch.equal(out, ref)


def test_masked_and_zero_agree_on_arbitrary_masks():
    """Any bool mask (also ones shrink_ cannot express, e.g. uneven GQA groups)."""
    model = model_of("llama-gqa")
    gen = torch.Generator().manual_seed(3)
    mask = [{"heads": torch.rand(8, generator=gen) > 0.5, "mlp": torch.rand(128, generator=gen) > 0.3}
            for _ in range(2)]
    mask[0]["heads"] = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    with S.masked(model, mask):
        a = logits(model)
    zeroed = copy.deepcopy(model)
    S.zero_(zeroed, mask)
    torch.testing.assert_close(logits(zeroed), a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same number in every"):
        S.shrink_(copy.deepcopy(model), mask)


def test_masked_removes_hooks_on_error():
    model = model_of("llama-gqa")
    mask = S.full_mask(model)
    mask[0]["heads"][0] = False
    with pytest.raises(RuntimeError):
        with S.masked(model, mask):
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- independent references
def test_masked_equals_smaller_model_built_by_hand_llama_gqa():
    """Remove query heads 1, 2, 5, 7 (two per KV group) and 40 channels per layer; the reference
    is a transformers model built from a config with 4 heads / 88 channels and weights copied by
    hand."""
    model = model_of("llama-gqa")
    drop_heads, drop_ch = [1, 2, 5, 7], list(range(0, 80, 2))
    mask = S.full_mask(model)
    for m in mask:
        m["heads"][drop_heads] = False
        m["mlp"][drop_ch] = False
    with S.masked(model, mask):
        a = logits(model)

    small = build(gqa_config(num_attention_heads=4, intermediate_size=88, head_dim=8))
    keep_h = [h for h in range(8) if h not in drop_heads]
    rows = torch.tensor([h * 8 + i for h in keep_h for i in range(8)])
    ch = torch.tensor([c for c in range(128) if c not in drop_ch])
    sd, ref = model.state_dict(), {}
    for name, t in sd.items():
        if name.endswith("q_proj.weight"):
            t = t[rows]
        elif name.endswith("o_proj.weight"):
            t = t[:, rows]
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            t = t[ch]
        elif name.endswith("down_proj.weight"):
            t = t[:, ch]
        ref[name] = t
    small.load_state_dict(ref)
    torch.testing.assert_close(logits(small.eval()), a, atol=1e-5, rtol=1e-5)


def test_masked_equals_hand_zeroed_out_proj_opt():
    model = model_of("opt")
    mask = S.full_mask(model)
    mask[1]["heads"][2] = False
    mask[0]["mlp"][[3, 50, 127]] = False
    with S.masked(model, mask):
        a = logits(model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.model.decoder.layers[1].self_attn.out_proj.weight[:, 32:48] = 0
        ref.model.decoder.layers[0].fc2.weight[:, [3, 50, 127]] = 0
    torch.testing.assert_close(logits(ref), a, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- export round trips
@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_uniform_export_loads_with_plain_from_pretrained(family, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from llmprune.evaluate.ppl import perplexity

    model = model_of(family)
    groups = S.layer_groups(model)
    # OPT: MLP only (its config derives head_dim from the head count, so fewer heads are not a
    # plain OPT config)
    kw = dict(sparsity=0.4) if family != "opt" else dict(mlp=0.4)
    mask = SEL.select(random_scores(groups, 1), groups, uniform=True, **kw)
    ids = torch.randint(0, VOCAB, (2 * 64,), generator=torch.Generator().manual_seed(1))
    with S.masked(model, mask):
        a = logits(model)
        ppl = perplexity(model, ids, 64, 2, progress=False)
    info = FMT.save_structured(model, tokenizer, tmp_path / "out", mask, {"method": "test"})
    assert info["loads_with"] == "AutoModelForCausalLM.from_pretrained"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert S.CONFIG_KEY not in config
    # save_structured shrank ``model`` in place: the masked model's logits up to the GEMM's
    # summation order (narrower matrices are reduced in other blocks, e.g. on AVX-512 CPUs:
    # 4e-8 apart here), and the round trip through the files is bit-exact
    shrunk_logits = logits(model)
    torch.testing.assert_close(shrunk_logits, a, atol=1e-5, rtol=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(loaded), shrunk_logits)
    assert perplexity(loaded, ids, 64, 2, progress=False) == perplexity(model, ids, 64, 2,
                                                                        progress=False)
    assert perplexity(loaded, ids, 64, 2, progress=False) == pytest.approx(ppl, rel=1e-5)
    meta = json.loads((tmp_path / "out" / "llmprune.json").read_text())
    assert meta["method"] == "test" and meta["removed_fraction"] == pytest.approx(
        S.removed_fraction(groups, mask))
    if family == "llama-gqa":
        assert (config["num_attention_heads"], config["num_key_value_heads"],
                config["head_dim"]) == (4, 2, 8)  # 0.4 of attention: 2 rounds of 2 heads
    else:
        assert config["ffn_dim"] == 128 - round(0.4 * 128)


@pytest.mark.parametrize("family,kw", [("llama-gqa", dict(sparsity=0.4, uniform=False)),
                                       ("qwen2", dict(sparsity=0.3, uniform=False, gqa="kv")),
                                       ("opt", dict(heads=0.25, uniform=True))])
def test_nonuniform_export_loads_with_load_pretrained(family, kw, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    import llmprune
    from llmprune.loaders import load_model

    model = model_of(family)
    groups = S.layer_groups(model)
    scores = random_scores(groups, 2)
    if kw.get("uniform") is False:  # make layer 0 clearly less important: widths must differ
        for s in scores[0].values():
            s.mul_(0.01)
    mask = SEL.select(scores, groups, **kw)
    with S.masked(model, mask):
        a = logits(model)
    FMT.save_structured(model, tokenizer, tmp_path / "out", mask, {"method": "test"})
    # ``model`` is shrunk now: the masked logits up to summation order, and the reference that
    # the files must reproduce bit for bit
    torch.testing.assert_close(logits(model), a, atol=1e-5, rtol=1e-5)
    a = logits(model)
    ref_gen = model.generate(IDS[:1, :6], max_new_tokens=6, do_sample=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    widths = config[S.CONFIG_KEY]["layers"]
    if kw.get("uniform") is False:
        assert widths[0] != widths[1]
    with pytest.raises(Exception, match="llmprune.load_pretrained"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    loaded = llmprune.load_pretrained(tmp_path / "out")
    assert torch.equal(logits(loaded), a)
    assert torch.equal(loaded.generate(IDS[:1, :6], max_new_tokens=6, do_sample=False), ref_gen)
    via_cli_loader, _, _ = load_model(str(tmp_path / "out"))
    assert torch.equal(logits(via_cli_loader), a)


def test_nonuniform_export_works_with_lm_eval_hflm(tmp_path, tokenizer):
    """lm-eval's HFLM (what llmprune eval --tasks wraps the in-memory model in) scores a
    continuation of the loaded non-uniform model with the log-probability computed by hand."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import llmprune

    model = model_of("llama-gqa")
    groups = S.layer_groups(model)
    scores = random_scores(groups, 4)
    scores[1]["mlp"].mul_(0.01)
    mask = SEL.select(scores, groups, mlp=0.3, uniform=False)
    FMT.save_structured(model, tokenizer, tmp_path / "out", mask, {})
    loaded = llmprune.load_pretrained(tmp_path / "out")
    lm = HFLM(pretrained=loaded, tokenizer=tokenizer, batch_size=1, device="cpu")
    ctx, cont = "the river stone", " of the city"
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)],
                                disable_tqdm=True)
    c = tokenizer(ctx, add_special_tokens=False)["input_ids"]
    whole = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(loaded(torch.tensor([whole[:-1]])).logits[0].float(), -1)
    hand = sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(whole[len(c):]))
    assert ll == pytest.approx(hand, abs=1e-4)


# ----------------------------------------------------------------------------- select
def _removed(mask, layer):
    return (~mask[layer]["heads"]).nonzero().flatten().tolist(), int((~mask[layer]["mlp"]).sum())


def test_select_sparsity_uniform_hand_counts():
    groups = [S.LayerGroups(8, 2, 8, 128, 1024, 1024, 192, 0)] * 2
    mask = SEL.select(random_scores(groups, 0), groups, sparsity=0.3)
    # attention holds 10240 params per layer; 0.3 of it is 3072: one round (2 heads, 2048) and
    # two rounds (4096) are equally near, the smaller wins. The MLP then makes up the total:
    # (0.3 * 69632 - 2 * 2048) / 192 = 87.5 channels -> 44 per layer.
    for layer in range(2):
        heads, n_ch = _removed(mask, layer)
        assert len(heads) == 2 and {h // 4 for h in heads} == {0, 1}  # one per KV group
        assert n_ch == 44
    removed = 2 * 2 * 1024 + 88 * 192
    assert S.removed_fraction(groups, mask) == removed / 69632
    assert abs(removed - 0.3 * 69632) <= 2 * 192  # within one channel per layer


def test_select_keeps_the_most_important():
    groups = [S.LayerGroups(8, 2, 8, 16, 1024, 1024, 192, 0)]
    scores = [{"heads": torch.tensor([5., 1., 7., 8., 3., 9., 2., 6.]),
               "mlp": torch.arange(16.).flip(0)}]
    mask = SEL.select(scores, groups, heads=0.5, mlp=0.25)
    # even: two rounds -> the two least important heads of each group {1, 0} and {6, 4}
    assert _removed(mask, 0) == ([0, 1, 4, 6], 4)
    assert mask[0]["mlp"][:12].all()  # channels 12..15 have the lowest scores
    # kv: group 0 sums to 21, group 1 to 20 -> group 1 (heads 4-7) goes
    mask = SEL.select(scores, groups, heads=0.5, gqa="kv")
    assert _removed(mask, 0) == ([4, 5, 6, 7], 0)
    assert S.removed_params(groups, mask) == 4 * 1024 + 1024  # its k/v go too


def test_select_per_kind_overrides_and_sparsity_with_one_kind():
    groups = [S.LayerGroups(8, 2, 8, 128, 1024, 1024, 192, 0)] * 3
    mask = SEL.select(random_scores(groups, 1), groups, heads=0.25, mlp=0.4)
    for layer in range(3):
        heads, n_ch = _removed(mask, layer)
        assert len(heads) == 2 and n_ch == round(0.4 * 128)
    # sparsity with heads fixed: the MLP makes up the rest
    mask = SEL.select(random_scores(groups, 1), groups, sparsity=0.5, heads=0.5)
    total = 3 * (8 * 1024 + 2 * 1024 + 128 * 192)
    assert all(len(_removed(mask, i)[0]) == 4 for i in range(3))
    assert abs(S.removed_params(groups, mask) - 0.5 * total) <= 3 * 192
    # heads only: no channel goes
    mask = SEL.select(random_scores(groups, 1), groups, heads=0.5)
    assert all(_removed(mask, i)[1] == 0 for i in range(3))


def test_select_nonuniform_global_ranking():
    groups = [S.LayerGroups(8, 2, 8, 128, 1024, 1024, 192, 0)] * 2
    scores = random_scores(groups, 5)
    scores[0]["heads"].mul_(0.01)  # layer 0's heads matter least
    scores[1]["mlp"].mul_(0.01)  # layer 1's channels matter least
    mask = SEL.select(scores, groups, heads=0.25, mlp=0.25, uniform=False)
    assert _removed(mask, 1) == ([], 0) or _removed(mask, 1)[0] == []
    heads0, ch0 = _removed(mask, 0)
    assert len(heads0) == 4 and ch0 == 0  # 4 of 16 heads, 2 rounds, all in layer 0
    assert sorted(h // 4 for h in heads0) == [0, 0, 1, 1]
    assert _removed(mask, 1)[1] == 64  # 64 of 256 channels, all from layer 1
    # a layer never loses its last head per group or its last channel
    mask = SEL.select(scores, groups, heads=0.9, mlp=0.9, uniform=False)
    for m in mask:
        assert m["heads"].reshape(2, 4).any(dim=1).all() and m["mlp"].any()


def test_select_nonuniform_sparsity_near_target():
    groups = [S.LayerGroups(8, 2, 8, 128, 1024, 1024, 192, 0)] * 4
    total = 4 * 34816
    for s in (0.1, 0.2, 0.4, 0.6):
        mask = SEL.select(random_scores(groups, 9), groups, sparsity=s, uniform=False)
        assert abs(S.removed_params(groups, mask) - s * total) <= 192  # one channel


@pytest.mark.parametrize("kw,msg", [(dict(sparsity=1.0), "--sparsity"),
                                    (dict(heads=-0.1), "--heads"),
                                    (dict(), "give a target"),
                                    (dict(sparsity=0.3, heads=0.1, mlp=0.1), "over-determines"),
                                    (dict(sparsity=0.3, gqa="odd"), "--gqa")])
def test_select_bad_targets(kw, msg):
    groups = [S.LayerGroups(8, 2, 8, 128, 1024, 1024, 192, 0)]
    with pytest.raises(UserError, match=msg):
        SEL.select(random_scores(groups, 0), groups, **kw)


# ----------------------------------------------------------------------------- baseline scores
def test_magnitude_scores_hand():
    model = model_of("llama-gqa")
    scores = SEL.magnitude_scores(model)
    layer = model.model.layers[1]
    a = layer.self_attn
    h = 5  # KV group 1
    sq = (a.q_proj.weight[40:48].pow(2).sum() + a.o_proj.weight[:, 40:48].pow(2).sum()
          + (a.k_proj.weight[8:16].pow(2).sum() + a.v_proj.weight[8:16].pow(2).sum()) / 4)
    torch.testing.assert_close(scores[1]["heads"][h], sq.sqrt().detach())
    c = 17
    m = layer.mlp
    sq = (m.gate_proj.weight[c].pow(2).sum() + m.up_proj.weight[c].pow(2).sum()
          + m.down_proj.weight[:, c].pow(2).sum())
    torch.testing.assert_close(scores[1]["mlp"][c], sq.sqrt().detach())


def test_activation_scores_hand_recomputation():
    """Head h's activation = A_h @ V_{kv(h)}, recomputed from eager attention probabilities and
    the attention input; channel c = act(gate(x))_c * up(x)_c from the MLP input."""
    model = model_of("llama-gqa")
    model.config._attn_implementation = "eager"
    ids = IDS
    scores = SEL.activation_scores(model, ids, batch_size=1, progress=False)
    attn_in, mlp_in = {}, {}
    layer = model.model.layers[1]
    h1 = layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: attn_in.update(x=kwargs["hidden_states"]), with_kwargs=True)
    h2 = layer.mlp.register_forward_pre_hook(lambda mod, args: mlp_in.update(x=args[0]))
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    h1.remove(), h2.remove()
    probs = out.attentions[1]  # [b, heads, s, s]
    v = layer.self_attn.v_proj(attn_in["x"]).reshape(2, 24, KV, HEAD_DIM)  # [b, s, kv, d]
    for h in range(HEADS):
        head_out = probs[:, h] @ v[:, :, h // 4]  # [b, s, d]
        torch.testing.assert_close(scores[1]["heads"][h], head_out.norm().detach(),
                                   rtol=1e-4, atol=1e-5)
    x = mlp_in["x"]
    inner = layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
    torch.testing.assert_close(scores[1]["mlp"], inner.reshape(-1, INTER).norm(dim=0).detach(),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- CLI
def test_cli_structured_end_to_end(checkpoint_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    rc = main(["-q", "structured", "--model", str(checkpoint_dir), "--importance", "activation",
               "--sparsity", "0.3", "--nsamples", "4", "--seqlen", "32", "--calib-data",
               str(text_file), "--output", str(out)])
    assert rc == 0
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["importance"] == "activation" and abs(meta["removed_fraction"] - 0.3) < 0.02
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size < 128
    assert "loads with AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out


def _one_line_error(capsys, argv, expect):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and expect in err, err


def test_cli_bad_input(checkpoint_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, MixtralConfig

    out = str(tmp_path / "never")
    base = ["structured", "--model", str(checkpoint_dir), "--output", out]
    _one_line_error(capsys, base + ["--sparsity", "1.5"], "--sparsity must be in [0, 1)")
    _one_line_error(capsys, base + ["--heads", "abc"], "--heads must be a number")
    _one_line_error(capsys, base, "give a target")
    _one_line_error(capsys, base + ["--sparsity", "0.3", "--heads", "0.2", "--mlp", "0.2"],
                    "over-determines")
    mixtral = tmp_path / "mixtral"
    AutoModelForCausalLM.from_config(MixtralConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=VOCAB, num_local_experts=4)).save_pretrained(mixtral)
    (tmp_path / "text.txt").write_text(random_text(200))
    _one_line_error(capsys, ["structured", "--model", str(mixtral), "--heads", "0.25",
                             "--output", out], "does not apply to model type 'mixtral'")
    assert not (tmp_path / "never").exists()


def test_uniform_head_count_llama_config_refuses_goes_to_load_pretrained(tmp_path, tokenizer):
    """transformers' LlamaConfig wants hidden_size % num_attention_heads == 0 even with an
    explicit head_dim: 6 heads on hidden 64 is recorded per layer and loads with load_pretrained."""
    import llmprune

    model = model_of("llama-gqa")
    mask = S.full_mask(model)
    for m in mask:
        m["heads"][[0, 4]] = False
    with S.masked(model, mask):
        a = logits(model)
    info = FMT.save_structured(model, tokenizer, tmp_path / "out", mask, {})
    assert info["loads_with"] == "llmprune.load_pretrained"
    assert torch.equal(logits(llmprune.load_pretrained(tmp_path / "out")), a)


def test_structured_help_explains_every_flag():
    import argparse

    from llmprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["structured"]
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
