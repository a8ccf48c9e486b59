"""Structured pruning (heads / MLP channels) on families without a registered adapter: the
layout is found from the model and its config (:mod:`llmprune.models.structured`).

The references do not use llmprune: each family's output projection and MLP output linear are
named by hand below, a removed head is its ``head_dim`` input columns of the output projection
zeroed by hand, a removed channel its input column of the MLP output linear; the shrunk
checkpoint is read back with plain ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llmprune.cli import main
from llmprune.core.errors import UnsupportedArchitectureError
from llmprune.models import adapter_for, structured_layout
from llmprune.models.structured import derive_layout
from llmprune.structured import format as FMT, selection as SEL, shrink as S

from .tiny_families import VOCAB, tiny_config

# family -> (decoder layers, output projection, MLP output linear, MLP width config key), by hand
HAND = {
    "gemma3_text": ("model.layers", "self_attn.o_proj", "mlp.down_proj", "intermediate_size"),
    "gemma2": ("model.layers", "self_attn.o_proj", "mlp.down_proj", "intermediate_size"),
    "phi3": ("model.layers", "self_attn.o_proj", "mlp.down_proj", "intermediate_size"),
    "smollm3": ("model.layers", "self_attn.o_proj", "mlp.down_proj", "intermediate_size"),
    "granite": ("model.layers", "self_attn.o_proj", "mlp.down_proj", "intermediate_size"),
    "glm4": ("model.layers", "self_attn.o_proj", "mlp.down_proj", "intermediate_size"),
    "starcoder2": ("model.layers", "self_attn.o_proj", "mlp.c_proj", "intermediate_size"),
    "qwen3": ("model.layers", "self_attn.o_proj", "mlp.down_proj", "intermediate_size"),
    # a fused query_key_value repeated per KV head; falcon is multi-query, falcon-classic
    # [heads, 3, head_dim] (with biases), falcon-grouped [kv_heads, q_per_kv + 2, head_dim]
    "gpt_neox": ("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h", "intermediate_size"),
    **{name: ("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", "ffn_hidden_size")
       for name in ("falcon", "falcon-classic", "falcon-grouped", "falcon-alibi")},
    # heads fixed (a norm over all heads; ALiBi slopes per head): MLP channels only
    "olmo2": ("model.layers", "self_attn.o_proj", "mlp.down_proj", "intermediate_size"),
}
HEADS_FIXED = {"olmo2", "falcon-alibi"}
# heads can go, but the config derives head_dim = hidden_size / heads and sizes query_key_value
# and dense from hidden_size: removing heads gives an export for llmprune.load_pretrained
HEADS_NOT_PLAIN = {"gpt_neox", "falcon", "falcon-classic", "falcon-grouped"}
HEAD_DIM = 16
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))


def family_model(model_type: str, seed: int = 0):
    """The tiny model of ``model_type`` with random biases (so biases matter in every check),
    and for Gemma a sliding window shorter than the inputs in its first layer."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    if model_type in ("gemma3_text", "gemma2"):
        config.sliding_window = 6
        config.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def hand_zeroed(model, model_type: str, mask):
    """A copy of ``model`` whose removed heads / channels feed nothing: their input columns of
    the output projection / MLP output linear zeroed, by hand."""
    layers_path, o_name, down_name, _ = HAND[model_type]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, m in zip(ref.get_submodule(layers_path), mask):
            cols = (~m["heads"]).repeat_interleave(HEAD_DIM)
            layer.get_submodule(o_name).weight[:, cols] = 0
            layer.get_submodule(down_name).weight[:, ~m["mlp"]] = 0
    return ref


def random_scores(groups, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"heads": torch.rand(g.n_heads, generator=gen),
             "mlp": torch.rand(g.n_channels, generator=gen)} for g in groups]


def reload(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("model_type", sorted(HAND))
def test_zero_removal_reloads_bit_identical(model_type, tmp_path):
    model = family_model(model_type)
    dense = logits(model)
    FMT.save_structured(model, None, tmp_path / "out", S.full_mask(model), {"method": "test"})
    loaded = reload(tmp_path / "out")
    assert torch.equal(logits(loaded), dense)


@pytest.mark.parametrize("gqa", ["even", "kv"])
@pytest.mark.parametrize("model_type", sorted(HAND))
def test_shrunk_family_equals_hand_zeroed_original(model_type, gqa, tmp_path):
    """Half the heads (``gqa="even"``: one of the two per KV head; ``"kv"``: a whole KV group)
    and a quarter of the MLP channels removed, chosen at random; the reloaded checkpoint's
    config and shapes are the smaller ones and its logits those of the hand-zeroed original.
    Families whose heads cannot go in a plain checkpoint lose MLP channels only here."""
    model = family_model(model_type)
    groups = S.layer_groups(model)
    heads = None if model_type in HEADS_FIXED | HEADS_NOT_PLAIN else 0.5
    mask = SEL.select(random_scores(groups, 3), groups, heads=heads, mlp=0.25, gqa=gqa)
    want = logits(hand_zeroed(model, model_type, mask))
    info = FMT.save_structured(model, None, tmp_path / "out", mask, {"method": "test"})
    assert info["loads_with"] == "AutoModelForCausalLM.from_pretrained"
    loaded = reload(tmp_path / "out")
    got = logits(loaded)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, logits(family_model(model_type)), atol=1e-3)

    base = family_model(model_type).config
    config = loaded.config
    layers_path, o_name, down_name, mlp_key = HAND[model_type]
    width = getattr(base, mlp_key) - getattr(base, mlp_key) // 4
    assert getattr(config, mlp_key) == width
    n_heads, n_kv = base.num_attention_heads, getattr(base, "num_key_value_heads", None)
    if heads:
        n_heads, n_kv = (2, 2) if gqa == "even" else (2, 1)
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
            n_heads, n_kv, HEAD_DIM)
    for layer in loaded.get_submodule(layers_path):
        assert layer.get_submodule(o_name).in_features == n_heads * HEAD_DIM
        assert layer.get_submodule(down_name).in_features == width
    if base.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    # decoding with the KV cache (the sliding window of Gemma included) as the reference does
    ref = hand_zeroed(family_model(model_type), model_type, mask)
    assert torch.equal(loaded.generate(IDS[:1, :10], max_new_tokens=4, do_sample=False),
                       ref.generate(IDS[:1, :10], max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("model_type,gqa,n_heads,n_kv", [
    ("gpt_neox", "even", 2, 2), ("falcon", "even", 2, 1), ("falcon-classic", "even", 2, 2),
    ("falcon-grouped", "even", 2, 2), ("falcon-grouped", "kv", 2, 1)])
def test_fused_query_key_value_heads_equal_hand_zeroed_original(model_type, gqa, n_heads, n_kv,
                                                                 tmp_path):
    """Half the query heads (gpt_neox, falcon-classic: one KV head per query head, so its k and v
    go with it; falcon: multi-query, the one KV head stays; falcon-grouped: one per KV group, or
    a whole KV group with its k and v) and a quarter of the channels removed at random from a
    fused ``query_key_value``. The config cannot hold the smaller head count (head_dim is
    hidden_size / heads, dense is hidden_size wide), so the export records the per-layer widths:
    a plain from_pretrained refuses it naming llmprune.load_pretrained, which loads it with the
    shrunk shapes, the hand-zeroed original's logits, and its greedy decoding with the KV
    cache."""
    import llmprune
    from transformers import AutoModelForCausalLM

    model = family_model(model_type)
    groups = S.layer_groups(model)
    mask = SEL.select(random_scores(groups, 3), groups, heads=0.5, mlp=0.25, gqa=gqa)
    want = logits(hand_zeroed(model, model_type, mask))
    info = FMT.save_structured(model, None, tmp_path / "out", mask, {"method": "test"})
    assert info["loads_with"] == "llmprune.load_pretrained"
    with pytest.raises(Exception, match="llmprune.load_pretrained"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    loaded = llmprune.load_pretrained(str(tmp_path / "out")).eval()
    got = logits(loaded)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, logits(family_model(model_type)), atol=1e-3)

    layers_path, o_name, down_name, mlp_key = HAND[model_type]
    base = tiny_config(model_type)
    width = getattr(base, mlp_key) - getattr(base, mlp_key) // 4
    assert loaded.config.llmprune_structured["layers"] == [
        {"n_heads": n_heads, "n_kv_heads": n_kv, "intermediate_size": width}] * 2
    qkv_name = o_name.replace("dense", "query_key_value")
    for layer in loaded.get_submodule(layers_path):
        assert layer.get_submodule(qkv_name).out_features == (n_heads + 2 * n_kv) * HEAD_DIM
        assert layer.get_submodule(o_name).in_features == n_heads * HEAD_DIM
        assert layer.get_submodule(down_name).in_features == width
    # why no plain config holds it: the class builds dense hidden_size wide whatever the heads
    base.num_attention_heads = n_heads
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base)
    assert skeleton.get_submodule(layers_path)[0].get_submodule(o_name).in_features == 64
    ref = hand_zeroed(family_model(model_type), model_type, mask)
    assert torch.equal(loaded.generate(IDS[:1, :10], max_new_tokens=4, do_sample=False),
                       ref.generate(IDS[:1, :10], max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt_neox", "falcon-grouped"])
def test_nonuniform_family_export_loads_with_load_pretrained(model_type, tmp_path):
    import llmprune

    model = family_model(model_type)
    groups = S.layer_groups(model)
    scores = random_scores(groups, 4)
    for s in scores[0].values():
        s.mul_(0.01)  # layer 0 clearly less important: widths differ
    mask = SEL.select(scores, groups, sparsity=0.4, uniform=False)
    want = logits(hand_zeroed(model, model_type, mask))
    FMT.save_structured(model, None, tmp_path / "out", mask, {"method": "test"})
    loaded = llmprune.load_pretrained(str(tmp_path / "out"))
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=1e-5)
    widths = loaded.config.llmprune_structured["layers"]
    assert widths[0] != widths[1]
    if model_type != "gemma3_text":  # a KV cache of a different head count in every layer
        ref = hand_zeroed(family_model(model_type), model_type, mask)
        assert torch.equal(loaded.generate(IDS[:1, :10], max_new_tokens=4, do_sample=False),
                           ref.generate(IDS[:1, :10], max_new_tokens=4, do_sample=False))


# ----------------------------------------------------------------------------- the layout
def test_derived_layout_of_llama_is_the_registered_one():
    from .conftest import tiny_model

    model = tiny_model("llama")
    adapter = adapter_for(model)
    assert derive_layout(adapter.layers(model), model.config) == adapter.structured


def _ranges(*spans: tuple[int, int]) -> list[int]:
    return [i for a, b in spans for i in range(a, b)]


def _index(lay, *widths) -> dict[str, list[tuple[str, list[int]]]]:
    return {kind: [(name, rows.tolist()) for name, rows in entries]
            for kind, entries in lay.row_index(*widths).items()}


def test_fused_projections_are_split_by_their_declared_blocks():
    lay = structured_layout(family_model("phi3"))
    assert lay.rows == (("self_attn.qkv_proj", ("q", "k", "v")),
                        ("mlp.gate_up_proj", ("mlp", "mlp")))
    # q: 4 heads x 16 rows, then k and v: 2 KV heads x 16 each; gate then up: 128 each
    assert _index(lay, 4, 2, 16, 128) == {
        "q": [("self_attn.qkv_proj", _ranges((0, 64)))],
        "k": [("self_attn.qkv_proj", _ranges((64, 96)))],
        "v": [("self_attn.qkv_proj", _ranges((96, 128)))],
        "mlp": [("mlp.gate_up_proj", _ranges((0, 128))),
                ("mlp.gate_up_proj", _ranges((128, 256)))]}


@pytest.mark.parametrize("model_type,n_kv,q,k,v", [
    # [kv_heads 2, (q q k v), 16]
    ("falcon-grouped", 2, ((0, 32), (64, 96)), ((32, 48), (96, 112)), ((48, 64), (112, 128))),
    # multi-query: the 4 q heads, then one k and one v head
    ("falcon", 1, ((0, 64),), ((64, 80),), ((80, 96),)),
    # [heads 4, (q k v), 16]
    ("falcon-classic", 4, ((0, 16), (48, 64), (96, 112), (144, 160)),
     ((16, 32), (64, 80), (112, 128), (160, 176)), ((32, 48), (80, 96), (128, 144), (176, 192))),
    ("gpt_neox", 4, ((0, 16), (48, 64), (96, 112), (144, 160)),
     ((16, 32), (64, 80), (112, 128), (160, 176)), ((32, 48), (80, 96), (128, 144), (176, 192)))])
def test_fused_query_key_value_rows_repeat_per_kv_head(model_type, n_kv, q, k, v):
    lay = structured_layout(family_model(model_type))
    qkv = HAND[model_type][1].replace("dense", "query_key_value")
    assert lay.per_kv_head == (qkv,) and lay.rows[0] == (qkv, ("q", "k", "v"))
    assert S.layer_groups(family_model(model_type))[0].n_kv_heads == n_kv
    index = _index(lay, 4, n_kv, 16, 96)
    assert (index["q"], index["k"], index["v"]) == (
        [(qkv, _ranges(*q))], [(qkv, _ranges(*k))], [(qkv, _ranges(*v))])


def test_group_importance_follows_the_per_kv_head_rows():
    """LoRAPrune's per-group sums on falcon-grouped's [kv 2, (q q k v), 16] rows: row r of
    query_key_value weighs r, so each head's sum shows which rows it was given."""
    from llmprune.structured.loraprune import group_importance

    model = family_model("falcon-grouped")
    lay, g = structured_layout(model), S.layer_groups(model)[0]
    qkv, o, down = "self_attention.query_key_value", lay.o, lay.mlp_out
    imp = {qkv: torch.arange(128.0)[:, None].expand(128, 64), o: torch.zeros(64, 64),
           "mlp.dense_h_to_4h": torch.zeros(256, 64), down: torch.zeros(64, 256)}
    heads = []
    for h in range(4):
        kv, j = divmod(h, 2)
        unit = 64 * kv  # the KV group's rows: its 2 query heads, its k head, its v head
        q_rows = range(unit + 16 * j, unit + 16 * (j + 1))
        kv_rows = range(unit + 32, unit + 64)
        heads.append(64 * sum(q_rows) + 64 * sum(kv_rows) / 2)
    torch.testing.assert_close(group_importance(imp, g, lay)["heads"], torch.tensor(heads))


@pytest.mark.parametrize("model_type,reason", [
    ("olmo2", "q_norm.weight spans all heads"),
    ("falcon-alibi", "ALiBi position biases are built per head from config.num_attention_heads")])
def test_heads_fixed_families_refuse_heads_in_one_line(model_type, reason):
    model = family_model(model_type)
    assert reason in structured_layout(model).fixed_heads
    with pytest.raises(UnsupportedArchitectureError, match="no attention head can be removed"):
        SEL.prune_structured(model, heads=0.25)
    mask = S.full_mask(model)
    mask[0]["heads"][0] = False
    with pytest.raises(UnsupportedArchitectureError, match="no attention head"):
        S.shrink_(copy.deepcopy(model), mask)
    # a sparsity target comes from the MLP alone
    mask, summary = SEL.prune_structured(model, sparsity=0.2)
    assert all(bool(m["heads"].all()) for m in mask) and summary["removed_fraction"] > 0.1


def test_phi3_refuses_different_head_counts_per_layer():
    model = family_model("phi3")
    with pytest.raises(UnsupportedArchitectureError, match="shared config"):
        SEL.prune_structured(model, sparsity=0.4, uniform=False)
    mask = S.full_mask(model)
    mask[0]["heads"][[0, 2]] = False
    with pytest.raises(UnsupportedArchitectureError, match="same heads in every layer"):
        S.shrink_(model, mask)
    SEL.prune_structured(model, mlp=0.3, uniform=False)  # channels may differ per layer


def _hybrid_lfm2():
    """LFM2 with a convolution layer, then an attention one."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("lfm2")
    config.layer_types = ["conv", "full_attention"]
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type,expect", [
    ("mixtral", "mixtures of 4 experts"), ("qwen3_moe", "mixtures of 4 experts"),
    ("jamba", "mixtures of 4 experts"), ("qwen3_5_text", "layer 0: "),
    ("lfm2-hybrid", "layer 0: "), ("lfm2", "holds its MLP width")])
def test_moe_and_hybrid_families_are_refused_in_one_line(model_type, expect):
    from .tiny_families import tiny_family_model

    model = _hybrid_lfm2() if model_type == "lfm2-hybrid" else tiny_family_model(model_type)
    with pytest.raises(UnsupportedArchitectureError) as exc:
        S.layer_groups(model)
    msg = str(exc.value)
    assert "\n" not in msg and "does not apply to model type" in msg and expect in msg, msg


# ----------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tokenizer):
    def make(model_type):
        path = tmp_path_factory.mktemp("sfam") / model_type
        family_model(model_type).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path
    return make


@pytest.mark.parametrize("model_type", ["gemma3_text", "phi3", "starcoder2"])
def test_cli_structured_on_discovered_family(model_type, family_dir, text_file, tmp_path):
    src = family_dir(model_type)
    out = tmp_path / "out"
    assert main(["-q", "structured", "--model", str(src), "--importance", "activation",
                 "--sparsity", "0.3", "--calib-data", str(text_file), "--nsamples", "4",
                 "--seqlen", "32", "--output", str(out)]) == 0
    loaded = reload(out)
    assert loaded.config.num_attention_heads < 4 or loaded.config.intermediate_size < 128
    assert torch.isfinite(logits(loaded)).all()


def test_cli_structured_heads_of_fused_query_key_value(family_dir, text_file, tmp_path):
    """Whole KV groups of falcon's grouped query_key_value removed from the command line; the
    export loads with llmprune.load_pretrained."""
    import json

    import llmprune

    out = tmp_path / "out"
    assert main(["-q", "structured", "--model", str(family_dir("falcon-grouped")),
                 "--importance", "activation", "--heads", "0.5", "--mlp", "0.25", "--gqa", "kv",
                 "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32",
                 "--output", str(out)]) == 0
    assert json.loads((out / "llmprune.json").read_text())["loads_with"] == \
        "llmprune.load_pretrained"
    loaded = llmprune.load_pretrained(str(out))
    assert loaded.config.llmprune_structured["layers"] == [
        {"n_heads": 2, "n_kv_heads": 1, "intermediate_size": 192}] * 2
    assert torch.isfinite(logits(loaded)).all()


@pytest.mark.parametrize("model_type", ["phi3", "falcon-grouped"])
@pytest.mark.parametrize("command", ["bonsai", "loraprune"])
def test_bonsai_and_loraprune_on_fused_qkv(command, model_type, family_dir, text_file, tmp_path):
    import llmprune

    src = family_dir(model_type)
    extra = (["--iterations", "2", "--samples", "6"] if command == "bonsai"
             else ["--steps", "4", "--prune-steps", "2"])
    out = tmp_path / "out"
    assert main(["-q", command, "--model", str(src), "--sparsity", "0.25", *extra,
                 "--calib-data", str(text_file), "--nsamples", "8", "--seqlen", "32",
                 "--batch-size", "4", "--output", str(out)]) == 0
    loaded = reload(out) if model_type == "phi3" else llmprune.load_pretrained(str(out))
    assert torch.isfinite(logits(loaded)).all()


def test_cli_refuses_moe_in_one_line(family_dir, tmp_path, capsys):
    from .tiny_families import tiny_family_model

    src = tmp_path / "mixtral"
    tiny_family_model("mixtral").save_pretrained(src)
    rc = main(["structured", "--model", str(src), "--mlp", "0.25", "--output",
               str(tmp_path / "never")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "mixtures of 4 experts" in err, err
    assert not (tmp_path / "never").exists()


def test_cli_heads_fixed_family_prunes_channels_refuses_heads(family_dir, tmp_path, capsys):
    src = str(family_dir("olmo2"))
    rc = main(["structured", "--model", src, "--heads", "0.25", "--output",
               str(tmp_path / "never")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "q_norm" in err and "--mlp" in err, err
    assert main(["-q", "structured", "--model", src, "--mlp", "0.25", "--output",
                 str(tmp_path / "out")]) == 0
    loaded = reload(tmp_path / "out")
    assert (loaded.config.num_attention_heads, loaded.config.intermediate_size) == (4, 96)


def test_bonsai_and_loraprune_keep_fixed_heads():
    """A sparsity target on a family whose heads are fixed comes from the MLP channels alone."""
    from llmprune.structured.bonsai import BonsaiConfig, Target, bonsai_mask
    from llmprune.structured.loraprune import LoRAPruneConfig, loraprune

    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    target = Target(sparsity=0.25)
    mask, _ = bonsai_mask(family_model("olmo2"), ids, BonsaiConfig(
        target=target, iterations=2, samples=6, sub_nsamples=4), progress=False)
    _, mask2, _ = loraprune(family_model("olmo2"), ids, LoRAPruneConfig(
        target=target, steps=4, prune_steps=2), progress=False)
    for m in mask + mask2:
        assert bool(m["heads"].all()) and not bool(m["mlp"].all())
