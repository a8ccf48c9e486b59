"""LoRAPrune: the LoRA-guided criterion against hand computations, only LoRA trainable, the
schedule reaching the target, shrunk == masked, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from llmprune.structured.bonsai import Target
from llmprune.cli import main
from llmprune.structured.loraprune import (LoRAPruneConfig, group_importance, lora_importance,
                                           loraprune, prune_schedule)
from llmprune.models import adapter_for
from llmprune.structured.shrink import LayerGroups

from tests.conftest import assert_shrunk_equals_masked, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_lora_importance_matches_a_hand_computation():
    """Eqs. (8)-(9) written out element by element with Python floats."""
    W0 = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]  # [out=2, in=3]
    A = [[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]]  # [r=2, in=3]
    B = [[0.2, -0.1], [0.4, 0.3]]  # [out=2, r=2]
    gA = [[0.3, 0.1, -0.2], [-0.5, 0.0, 0.7]]
    gB = [[1.0, -1.0], [0.5, 2.0]]
    s = 2.0
    want = torch.zeros(2, 3)
    for i in range(2):
        for j in range(3):
            g_hat = s * sum(gB[i][k] * A[k][j] + B[i][k] * gA[k][j] for k in range(2))
            merged = W0[i][j] + s * sum(B[i][k] * A[k][j] for k in range(2))
            want[i, j] = (merged * g_hat) ** 2
    got = lora_importance(*(torch.tensor(x) for x in (W0, A, B, gA, gB)), scaling=s)
    torch.testing.assert_close(got, want)


def test_group_importance_sums_each_groups_weights():
    lay = adapter_for(tiny_model("llama")).structured
    # 4 query heads of dim 2 in 2 KV groups, 3 channels, 5 hidden units
    g = LayerGroups(n_heads=4, n_kv_heads=2, head_dim=2, n_channels=3, head_params=0,
                    kv_params=0, channel_params=0)
    rows = lambda n, scale: (torch.arange(n, dtype=torch.float32) * scale)[:, None].expand(n, 5)
    q, k, v = (lay.names(kind)[0] for kind in "qkv")
    imp = {q: rows(8, 1.0), k: rows(4, 100.0), v: rows(4, 1000.0),
           lay.o: rows(8, 10.0).T.contiguous(),  # [hidden=5, heads*dim=8], column c = 10 c
           "mlp.gate_proj": rows(3, 1.0), "mlp.up_proj": torch.ones(3, 5),
           lay.mlp_out: rows(3, 7.0).T.contiguous()}
    out = group_importance(imp, g, lay)
    heads = []
    for h in range(4):
        r = (2 * h, 2 * h + 1)
        kv = h // 2
        kv_rows = (2 * kv, 2 * kv + 1)
        q = sum(5 * r_ for r_ in r)
        o = sum(5 * 10 * r_ for r_ in r)
        kvv = sum(5 * (100 * x + 1000 * x) for x in kv_rows) / 2  # shared by 2 query heads
        heads.append(q + o + kvv)
    mlp = [5 * c + 5 + 5 * 7 * c for c in range(3)]
    torch.testing.assert_close(out["heads"], torch.tensor(heads))
    torch.testing.assert_close(out["mlp"], torch.tensor(mlp, dtype=torch.float32))


def test_prune_schedule_is_even_and_ends_exactly_at_the_target():
    assert prune_schedule(100, 5, 0.6) == [(12, 0.2), (24, 0.4), (36, 0.6), (48, 0.8), (60, 1.0)]
    ev = prune_schedule(7, 3, 1.0)
    assert [f for _, f in ev][-1] == 1.0 and ev[-1][0] == 7
    assert [s for s, _ in ev] == sorted({s for s, _ in ev})  # distinct, increasing


def test_only_lora_is_trainable_and_the_target_is_reached(calib_ids):
    model = tiny_model("llama")  # 2 layers, hidden 64, 4 heads / 2 KV heads of 16, 128 channels
    seen = []

    def hook(module, args, output):
        base = [p.requires_grad for n, p in module.named_parameters() if "lora_" not in n]
        lora = [p.requires_grad for n, p in module.named_parameters() if "lora_" in n]
        seen.append((any(base), all(lora), len(lora)))

    handle = model.register_forward_hook(hook)
    cfg = LoRAPruneConfig(Target(heads=0.5, mlp=0.25), steps=6, prune_steps=3, prune_until=1.0,
                          rank=8)
    merged, mask, info = loraprune(model, calib_ids, cfg, progress=False)
    handle.remove()
    assert len(seen) == 6 and all(s == (False, True, 2 * 7 * 2) for s in seen)
    # r (in + out) per LoRA'd linear: q 64->64, k/v 64->32, o 64->64, gate/up 64->128, down 128->64
    per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert info["trainable_params"] == 2 * per_layer == 16384
    assert all(p.grad is None for p in merged.parameters())  # no base weight got a gradient
    assert not any("lora" in n for n, _ in merged.named_parameters())  # merged and unwrapped
    # iterative: three events of increasing size, the last exactly the target:
    # half the heads (one per KV group) and a quarter of the 128 channels in every layer
    fr = [e["removed_fraction"] for e in info["events"]]
    assert [e["step"] for e in info["events"]] == [2, 4, 6] and fr == sorted(fr) and fr[0] > 0
    for m in mask:
        h = m["heads"].reshape(2, 2)
        assert int((~m["heads"]).sum()) == 2 and bool((h.sum(1) == 1).all())
        assert int((~m["mlp"]).sum()) == 32


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_loraprune_shrunk_logits_equal_masked_logits(family, calib_ids):
    model = tiny_model(family)
    cfg = LoRAPruneConfig(Target(sparsity=0.3), steps=3, prune_steps=2, lr=1e-3)
    merged, mask, info = loraprune(model, calib_ids, cfg, progress=False)
    assert abs(info["removed_fraction"] - 0.3) < 0.1
    assert_shrunk_equals_masked(merged, mask, calib_ids[:2])


def test_cli_loraprune_writes_a_plain_smaller_checkpoint(checkpoint_dir, text_file, tmp_path,
                                                         capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lp"
    rc = main(["-q", "loraprune", "--model", str(checkpoint_dir), "--sparsity", "0.3",
               "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32",
               "--steps", "4", "--prune-steps", "2", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "trainable parameters: 16,384" in printed
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["method"] == "loraprune" and meta["report"]["trainable_params"] == 16384
    assert meta["report"]["peak_rss_mib"] > 0
    small = AutoModelForCausalLM.from_pretrained(out)
    assert small.config.intermediate_size < 128


@pytest.mark.parametrize("argv, needle", [
    (["--sparsity", "0.3", "--load-8bit"], "--load-8bit"),
    (["--sparsity", "0.3", "--prune-steps", "9", "--steps", "4"], "--prune-steps"),
    (["--heads", "0.2", "--mlp", "0.2", "--sparsity", "0.3"], "over-determines"),
])
def test_cli_loraprune_bad_input_is_one_line(argv, needle, checkpoint_dir, text_file, tmp_path,
                                             capsys):
    out = tmp_path / "never"
    rc = main(["loraprune", "--model", str(checkpoint_dir), "--calib-data", str(text_file),
               "--seqlen", "32", "--output", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err
    assert not out.exists()
