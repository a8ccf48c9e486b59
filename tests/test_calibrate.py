"""The layer-wise engine on tiny random models of every supported family."""

import pytest
import torch

import llmprune
from llmprune import PruneRecipe
from llmprune.engine.calibrate import EngineOptions, capture_inputs
from llmprune.core.errors import PatternError, UnsupportedArchitectureError
from llmprune.core.masks import n_pruned, nm_violations
from llmprune.models import adapter_for

from tests.conftest import FAMILIES, tiny_model

PATTERNS = [(0.5, None), (0.3, None), (None, "2:4"), (None, "4:8")]


def _linears(model):
    adapter = adapter_for(model)
    for i, layer in enumerate(adapter.layers(model)):
        for name, lin in adapter.linears(layer).items():
            yield f"{i}.{name}", lin


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity,pattern", PATTERNS)
def test_exact_sparsity_every_family(family, method, sparsity, pattern, calib_ids):
    """Acceptance 4: per layer for SparseGPT and magnitude, per output row for Wanda, and at most
    N nonzeros in every group of M for N:M."""
    model = tiny_model(family)
    dense = {n: lin.weight.detach().clone() for n, lin in _linears(model)}
    recipe = PruneRecipe(method, sparsity=sparsity, pattern=pattern, batch_size=4)
    report = llmprune.prune(model, recipe, calib_ids=calib_ids, keep_masks=True, progress=False)
    assert len(report.layers) == 2 * 7 - (2 if family == "opt" else 0)
    for name, lin in _linears(model):
        w = lin.weight.detach()
        out_f, in_f = w.shape
        zeros = (w == 0)
        mask = report.pruned_mask(next(k for k in report.masks if k.endswith(name)))
        assert torch.equal(zeros, mask), name  # the mask is exactly where the zeros are
        if pattern:
            n, m = map(int, pattern.split(":"))
            assert nm_violations(w, n, m) == 0
            assert int(zeros.sum()) == out_f * in_f * (m - n) // m
        elif method == "wanda":
            assert (zeros.sum(1) == n_pruned(in_f, sparsity)).all()
        else:
            assert abs(int(zeros.sum()) - sparsity * out_f * in_f) <= in_f / 128 + 1
        if method != "sparsegpt":  # only SparseGPT may change the weights it keeps
            assert torch.equal(w[~zeros], dense[name][~zeros])


def test_pruned_outputs_feed_the_next_layer(calib_ids):
    """Layer 1's statistics must come from the *pruned* layer 0, computed here by hand."""
    model = tiny_model("llama")
    reference = tiny_model("llama")
    recipe = PruneRecipe("wanda", sparsity=0.5, batch_size=8)
    llmprune.prune(model, recipe, calib_ids=calib_ids, progress=False)
    # Recompute layer 1's q/k/v Wanda statistics independently: run the pruned layer 0 on the
    # captured inputs, then layer 1's input norm, then Wanda by hand on the dense layer 1.
    adapter = adapter_for(model)
    (hidden, kwargs), = capture_inputs(model, adapter, calib_ids, EngineOptions(batch_size=8))
    with torch.no_grad():
        h1 = adapter.layers(model)[0](hidden, **kwargs)
        x = adapter.layers(reference)[1].input_layernorm(h1).reshape(-1, 64)
    w = adapter.layers(reference)[1].self_attn.q_proj.weight.detach()
    score = w.abs() * x.norm(dim=0)
    expected = torch.zeros_like(w, dtype=torch.bool).scatter_(
        1, score.topk(32, dim=1, largest=False).indices, True)
    got = adapter.layers(model)[1].self_attn.q_proj.weight == 0
    assert torch.equal(got, expected)
    # ... and not from the dense layer 0.
    with torch.no_grad():
        x_dense = adapter.layers(reference)[1].input_layernorm(
            adapter.layers(reference)[0](hidden, **kwargs)).reshape(-1, 64)
    score_dense = w.abs() * x_dense.norm(dim=0)
    dense_mask = torch.zeros_like(w, dtype=torch.bool).scatter_(
        1, score_dense.topk(32, dim=1, largest=False).indices, True)
    assert not torch.equal(got, dense_mask)


def test_capture_has_no_kv_cache(calib_ids):
    model = tiny_model("llama")
    captured = capture_inputs(model, adapter_for(model), calib_ids, EngineOptions(batch_size=4))
    assert len(captured) == 2 and captured[0][0].shape == (4, 32, 64)
    for _, kwargs in captured:
        assert kwargs.get("past_key_values") is None
        assert "position_embeddings" in kwargs


def test_batching_does_not_change_statistics(calib_ids):
    """Batches must not see each other (no leaked KV cache): batch size 1 and 8 agree."""
    a, b = tiny_model("llama"), tiny_model("llama")
    for model, bs in ((a, 1), (b, 8)):
        llmprune.prune(model, PruneRecipe("sparsegpt", sparsity=0.5, batch_size=bs,
                                          calib_dtype="fp32"),
                       calib_ids=calib_ids, progress=False)
    for (n, la), (_, lb) in zip(_linears(a), _linears(b)):
        assert torch.equal(la.weight == 0, lb.weight == 0), n
        torch.testing.assert_close(la.weight, lb.weight, rtol=1e-3, atol=1e-4)


def test_true_sequential_differs_and_is_exact(calib_ids):
    a, b = tiny_model("llama"), tiny_model("llama")
    llmprune.prune(a, PruneRecipe("sparsegpt", sparsity=0.5, true_sequential=False),
                   calib_ids=calib_ids, progress=False)
    llmprune.prune(b, PruneRecipe("sparsegpt", sparsity=0.5),
                   calib_ids=calib_ids, progress=False)
    qa = adapter_for(a).layers(a)[0].self_attn.q_proj.weight
    qb = adapter_for(b).layers(b)[0].self_attn.q_proj.weight
    assert torch.equal(qa, qb)  # q/k/v come first: same inputs either way
    oa = adapter_for(a).layers(a)[0].self_attn.o_proj.weight
    ob = adapter_for(b).layers(b)[0].self_attn.o_proj.weight
    assert not torch.equal(oa, ob)  # o sees pruned q/k/v only in true-sequential order
    assert int((ob == 0).sum()) == ob.numel() // 2


def test_magnitude_runs_no_forward_pass(calib_ids):
    model = tiny_model("llama")
    calls = []
    for layer in adapter_for(model).layers(model):
        layer.register_forward_pre_hook(lambda *a: calls.append(1))
    model.get_input_embeddings().register_forward_pre_hook(lambda *a: calls.append(1))
    report = llmprune.prune(model, PruneRecipe("magnitude", sparsity=0.5), progress=False)
    assert calls == [] and report.sparsity == pytest.approx(0.5)


def test_bf16_forward_keeps_fp32_master_weights(calib_ids):
    model = tiny_model("llama")
    llmprune.prune(model, PruneRecipe("wanda", sparsity=0.5, calib_dtype="bf16"),
                   calib_ids=calib_ids, progress=False)
    lin = adapter_for(model).layers(model)[1].mlp.down_proj
    assert lin.weight.dtype == torch.float32
    assert ((lin.weight == 0).sum(1) == 64).all()


def test_pattern_must_divide_every_layer(calib_ids):
    model = tiny_model("llama")
    with pytest.raises(PatternError, match="does not divide the input width 64"):
        llmprune.prune(model, PruneRecipe("wanda", pattern="3:5"), calib_ids=calib_ids)
    assert (adapter_for(model).layers(model)[0].self_attn.q_proj.weight != 0).all()


def test_model_without_findable_layers_is_one_clear_error():
    # GPT-2's blocks hold transformers' Conv1D, not nn.Linear: no list of blocks with linears
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    want = r"cannot find decoder layers in GPT2LMHeadModel \(model type 'gpt2'\)"
    with pytest.raises(UnsupportedArchitectureError, match=want):
        llmprune.prune(model, PruneRecipe("magnitude", sparsity=0.5))


def test_auto_calib_dtype_policy(calib_ids):
    from llmprune.core.device import bf16_is_fast
    from llmprune.engine.prune import resolve_calib_dtype
    from llmprune.solvers import get_solver

    model = tiny_model("llama")
    sg = PruneRecipe("sparsegpt", sparsity=0.5)
    expected = torch.bfloat16 if bf16_is_fast("cpu") else None
    assert resolve_calib_dtype(sg, get_solver("sparsegpt"), model) == expected
    assert resolve_calib_dtype(PruneRecipe("wanda", sparsity=0.5), get_solver("wanda"),
                               model) is None
    assert resolve_calib_dtype(PruneRecipe("sparsegpt", sparsity=0.5, calib_dtype="fp32"),
                               get_solver("sparsegpt"), model) == torch.float32
    assert resolve_calib_dtype(sg, get_solver("sparsegpt"), model.to(torch.bfloat16)) is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,sparsity,pattern,dtype", [
    ("sparsegpt", 0.5, None, "fp32"), ("sparsegpt", None, "2:4", "bf16"),
    ("wanda", 0.5, None, "fp32"), ("wanda", None, "4:8", "fp32")])
def test_true_sequential_one_pass_equals_multi_pass(family, method, sparsity, pattern, dtype,
                                                    calib_ids, monkeypatch):
    """The lock-step single forward pass gives bit-identical weights to the schedule that runs
    one calibration pass per group and a propagation pass, and runs each layer once per batch."""
    import functools

    import llmprune.engine.prune as engine_prune

    recipe = PruneRecipe(method, sparsity=sparsity, pattern=pattern, true_sequential=True,
                         batch_size=3, calib_dtype=dtype)
    fused, multi = tiny_model(family), tiny_model(family)
    calls = []
    for layer in adapter_for(fused).layers(fused):
        layer.register_forward_pre_hook(lambda *a: calls.append(1))
    llmprune.prune(fused, recipe, calib_ids=calib_ids, progress=False)
    n_layers = len(adapter_for(fused).layers(fused))
    n_batches = -(-calib_ids.shape[0] // 3)
    assert len(calls) == n_layers * n_batches  # one forward per batch per layer, no more
    monkeypatch.setattr(engine_prune, "EngineOptions",
                        functools.partial(engine_prune.EngineOptions, fused=False))
    llmprune.prune(multi, recipe, calib_ids=calib_ids, progress=False)
    for (n, la), (_, lb) in zip(_linears(fused), _linears(multi)):
        assert torch.equal(la.weight, lb.weight), n
    assert any(bool((la.weight == 0).any()) for _, la in _linears(fused))


def test_one_pass_error_in_a_batch_reaches_the_caller(calib_ids):
    """A batch thread that fails does not leave the other batch threads waiting forever."""
    model = tiny_model("llama")
    layer = adapter_for(model).layers(model)[1]
    seen = []

    def fail_on_third(_mod, _args):
        seen.append(1)
        if len(seen) == 3:
            raise RuntimeError("boom in batch 2")
    layer.mlp.down_proj.register_forward_pre_hook(fail_on_third)
    with pytest.raises(RuntimeError, match="boom in batch 2"):
        llmprune.prune(model, PruneRecipe("wanda", sparsity=0.5, true_sequential=True,
                                          batch_size=2), calib_ids=calib_ids, progress=False)


def test_true_sequential_falls_back_to_one_pass_per_group_over_budget(calib_ids, monkeypatch):
    """Where the lock-step pass's activations exceed the budget, each group gets its own
    calibration pass (more forward calls) and the weights are the same bit for bit."""
    import functools

    import llmprune.engine.prune as engine_prune
    from llmprune.engine.calibrate import lockstep_bytes

    recipe = PruneRecipe("wanda", sparsity=0.5, batch_size=4)
    fused, tight = tiny_model("llama"), tiny_model("llama")
    counts = {}
    for name, model in (("fused", fused), ("tight", tight)):
        counts[name] = []
        for layer in adapter_for(model).layers(model):
            layer.register_forward_pre_hook(lambda *a, _c=counts[name]: _c.append(1))
    llmprune.prune(fused, recipe, calib_ids=calib_ids, progress=False)
    monkeypatch.setattr(engine_prune, "EngineOptions",
                        functools.partial(engine_prune.EngineOptions, fuse_budget=1))
    llmprune.prune(tight, recipe, calib_ids=calib_ids, progress=False)
    n_batches = -(-calib_ids.shape[0] // 4)
    assert len(counts["fused"]) == 2 * n_batches
    # 4 group passes per layer, plus a propagation pass but after the last layer
    assert len(counts["tight"]) == (4 + 1 + 4) * n_batches
    for (n, la), (_, lb) in zip(_linears(fused), _linears(tight)):
        assert torch.equal(la.weight, lb.weight), n
    # the estimate: tokens x (4 x hidden + widest input) x 4 bytes for this float32 model
    layer = adapter_for(fused).layers(fused)[0]
    inputs = [(torch.zeros(4, 16, 64), {}), (torch.zeros(2, 16, 64), {})]
    assert lockstep_bytes(layer, adapter_for(fused).groups, inputs) == 6 * 16 * (4 * 64 + 128) * 4
