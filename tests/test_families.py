"""Model families without a registered adapter: found from the model itself.

Each family is a tiny random model of transformers' own class, saved with a tokenizer, pruned
through the CLI, and reloaded with plain ``AutoModelForCausalLM.from_pretrained``. The checks
do not use llmprune's discovery: the prunable weights are every ``nn.Linear`` except the LM head.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from llmprune.cli import main
from llmprune.core.errors import UnsupportedArchitectureError
from llmprune.engine.calibrate import EngineOptions, capture_inputs, layer_groups
from llmprune.models import adapter_for, discover
from llmprune.models.discovery import find_layers_path, watch_groups

import llmprune

from .conftest import DISCOVERED, MOE, same_bits, tiny_model
from .tiny_families import VOCAB, tiny_family_model


def _decoder_linears(model) -> dict[str, nn.Linear]:
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    def make(model_type):
        path = tmp_path_factory.mktemp("fam") / model_type
        tiny_family_model(model_type).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path
    return make


@pytest.mark.parametrize("model_type", sorted(DISCOVERED))
def test_prune_save_reload_any_family(model_type, family_dirs, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    src = family_dirs(model_type)
    calib = ["--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32"]
    runs = {"sparsegpt": ["--sparsity", "0.5"], "wanda": ["--pattern", "2:4"]}
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    for method, target in runs.items():
        out = tmp_path / method
        assert main(["-q", method, "--model", str(src), *target, *calib, "--output", str(out)]) == 0
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        lins = _decoder_linears(model)
        assert lins
        for name, lin in lins.items():
            w = lin.weight.detach()
            zero = w == 0
            if method == "sparsegpt":
                # 50% of the weights of every linear, to one weight per row
                assert abs(int(zero.sum()) - w.numel() // 2) <= w.shape[0], name
            else:  # at least 2 zeros in every group of 4 consecutive inputs
                assert (zero.reshape(w.shape[0], -1, 4).sum(-1) >= 2).all(), name
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt"])
def test_discovery_finds_the_registered_layouts(family):
    """What discovery finds on the registered families is exactly their declared layout."""
    model = tiny_model(family)
    declared, found = adapter_for(model), discover(model)
    assert found.groups is None and found.layers_path == declared.layers_path
    inputs = capture_inputs(model, found, torch.randint(0, VOCAB, (2, 16)),
                            EngineOptions(progress=False))
    for layer in found.layers(model):
        assert found.linears(layer) == declared.linears(layer)
        assert layer_groups(found, layer, inputs) == declared.groups


def test_watch_groups_by_tensor_identity():
    """Hand-built layer: a and b read x, c reads a copy of x (other memory: its own group),
    d reads a's output, e is never called."""
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d, self.e = (nn.Linear(4, 4) for _ in range(5))

        def forward(self, x):
            return self.d(self.c(x.clone()) + self.a(x)) + self.b(x)

    layer = Layer()
    lins = {n: getattr(layer, n) for n in "abcde"}
    groups = watch_groups(lins, lambda: layer(torch.randn(2, 4)))
    assert groups == (("c",), ("a", "b"), ("d",), ("e",))


def test_layers_are_the_no_split_blocks_not_a_longer_list():
    """A list of experts longer than the list of layers is not taken for the layers."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))

    class Model(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))

    assert find_layers_path(Model()) == "blocks"
    Model._no_split_modules = []
    assert find_layers_path(Model()) == "blocks.0.experts"  # longest list, without the hint


def test_router_linears_are_not_prunable():
    from llmprune.models.discovery import prunable_linears

    layer = nn.Module()
    layer.moe = nn.Module()
    layer.moe.gate = nn.Linear(8, 4)  # 4 experts: the router, beside them
    layer.moe.experts = nn.ModuleList(nn.Linear(8, 4) for _ in range(4))
    layer.out = nn.Linear(8, 4)  # 4 outputs, but no experts beside it: not a router
    assert list(prunable_linears(layer, experts=4)) == [
        "moe.experts.0", "moe.experts.1", "moe.experts.2", "moe.experts.3", "out"]
    assert "moe.gate" in prunable_linears(layer)


def test_model_without_linear_blocks_is_refused_in_one_line():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "toy"})()
            self.blocks = nn.ModuleList(nn.Conv1d(2, 2, 1) for _ in range(2))

    with pytest.raises(UnsupportedArchitectureError, match="cannot find decoder layers") as e:
        discover(Model())
    assert "\n" not in str(e.value)


def _state(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("model_type", sorted(DISCOVERED))
def test_every_capability_on_any_family(model_type, family_dirs, text_file, tmp_path):
    """OWL, --stream (bit-identical to the in-memory run), compact export read back by
    load_pretrained, PERP (zeros kept) and DARE on a discovered family."""
    import llmprune

    src = str(family_dirs(model_type))
    calib = ["--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32"]
    run = lambda *args: main(["-q", *map(str, args)])  # noqa: E731
    owl, mem, stream = tmp_path / "owl", tmp_path / "mem", tmp_path / "stream"
    assert run("wanda", "--model", src, "--sparsity", "0.5", "--allocation", "owl", *calib,
               "--output", owl) == 0
    weights = [w for k, w in _state(owl).items() if k.endswith(".weight") and w.dim() == 2]
    assert len({round(float((w == 0).float().mean()), 2) for w in weights}) > 1  # non-uniform
    assert run("sparsegpt", "--model", src, "--sparsity", "0.5", *calib, "--output", mem) == 0
    assert run("sparsegpt", "--model", src, "--sparsity", "0.5", *calib, "--stream",
               "--output", stream) == 0
    a, b = _state(mem), _state(stream)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert run("export", mem, "--format", "compact", "--output", tmp_path / "compact") == 0
    loaded = llmprune.load_pretrained(str(tmp_path / "compact"))
    got = loaded.state_dict()
    assert all(torch.equal(got[k], a[k]) for k in a if k in got) and set(a) <= set(got)

    assert run("perp", "--model", mem, "--steps", "2", "--batch-size", "2", "--seqlen", "32",
               "--nsamples", "4", "--calib-data", text_file, "--output", tmp_path / "perp") == 0
    retrained = _state(tmp_path / "perp")
    for name, lin in _decoder_linears(tiny_family_model(model_type)).items():
        key = name + ".weight"
        assert torch.equal(retrained[key][a[key] == 0], torch.zeros_like(a[key][a[key] == 0]))

    assert run("dare", "--base", src, "--finetuned", tmp_path / "perp", "--drop", "0.5",
               "--output", tmp_path / "dare") == 0
    assert _state(tmp_path / "dare").keys() == a.keys()


def _expert_params(model) -> dict[str, torch.Tensor]:
    """The fused expert weights (tiny MoE models have 4 experts), plus every other linear's
    weight as one "expert" [1, out, in], except the routers (4 outputs)."""
    out = {n: p.detach() for n, p in model.named_parameters() if p.dim() == 3 and p.shape[0] == 4}
    out.update({n: lin.weight.detach()[None] for n, lin in _decoder_linears(model).items()
                if lin.out_features != 4})
    return out


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_moe_experts_pruned_in_their_own_layout(model_type, family_dirs, text_file, tmp_path):
    """Every expert of every fused expert parameter at the target, routers unchanged, the
    family's layout kept: plain from_pretrained loads every pruned expert."""
    from transformers import AutoModelForCausalLM

    src = family_dirs(model_type)
    dense = AutoModelForCausalLM.from_pretrained(src)
    calib = ["--calib-data", str(text_file), "--nsamples", "8", "--seqlen", "32"]
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    for method, target in {"sparsegpt": ["--sparsity", "0.5"],
                           "wanda": ["--pattern", "2:4"]}.items():
        out = tmp_path / method
        assert main(["-q", method, "--model", str(src), *target, *calib,
                     "--output", str(out)]) == 0
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        experts = _expert_params(model)
        assert experts
        transposed = model_type in ("gpt_oss", "llama4_text")  # [experts, in, out]
        for name, p in experts.items():
            for e, w in enumerate(p):
                w = w.T if transposed and p.shape[0] == 4 else w  # [out, in]
                zero = w == 0
                if method == "sparsegpt":
                    assert abs(int(zero.sum()) - w.numel() // 2) <= w.shape[0], (name, e)
                else:
                    assert (zero.reshape(w.shape[0], -1, 4).sum(-1) >= 2).all(), (name, e)
        before, after = dense.state_dict(), model.state_dict()
        routers = [k for k in after if ("router" in k or ".gate." in k)
                   and after[k].dim() == 2 and after[k].shape[0] == 4]
        assert routers and all(torch.equal(after[k], before[k]) for k in routers)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()


def test_each_expert_is_calibrated_on_its_routed_tokens():
    """Wanda on a tiny Mixtral, checked against a hand computation: expert e's scores use the
    norms of exactly the tokens the router sent to e (read from the router's own top-k)."""
    import llmprune
    from llmprune.recipe import PruneRecipe

    model = tiny_family_model("mixtral")
    moe = model.model.layers[0].mlp
    seen = {}

    def grab(_mod, args, kwargs):  # the experts module's (tokens, top_k_index, weights)
        seen["x"], seen["idx"] = args[0].detach().clone(), args[1].detach().clone()
    handle = moe.experts.register_forward_pre_hook(grab, with_kwargs=True)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    dense = moe.experts.gate_up_proj.detach().clone()
    with torch.no_grad():
        tokens = []
        for batch in ids.split(4):
            model(input_ids=batch)
            tokens.append((seen["x"], seen["idx"]))
    handle.remove()
    # one calibration pass over the dense layer (true-sequential would prune attention first)
    llmprune.prune(model, PruneRecipe("wanda", sparsity=0.5, batch_size=4, true_sequential=False),
                   calib_ids=ids,
                   progress=False)
    x, idx = tokens[0]
    for e in range(4):
        routed = x[(idx == e).any(-1)]
        assert len(routed) > 0
        score = dense[e].abs() * routed.float().square().sum(0).sqrt()  # Wanda Eq. (1)
        k = dense.shape[2] // 2
        want_pruned = torch.zeros_like(score, dtype=torch.bool).scatter_(
            1, score.topk(k, dim=1, largest=False).indices, True)
        got_pruned = moe.experts.gate_up_proj[e].detach() == 0
        assert torch.equal(got_pruned, want_pruned), e


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("saliency", ["reap", "frequency"])
def test_experts_command_keeps_half_and_reloads(model_type, saliency, family_dirs, text_file,
                                                 tmp_path):
    from transformers import AutoModelForCausalLM

    src, out = family_dirs(model_type), tmp_path / "out"
    assert main(["-q", "experts", "--model", str(src), "--keep-ratio", "0.5", "--saliency",
                 saliency, "--calib-data", str(text_file), "--nsamples", "8", "--seqlen", "32",
                 "--output", str(out)]) == 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    dense = AutoModelForCausalLM.from_pretrained(src)
    experts = {n: p for n, p in model.named_parameters() if p.dim() == 3 and p.shape[0] == 2}
    assert experts and all(dense.get_parameter(n).shape[0] == 4 for n in experts)
    meta = json.loads((out / "llmprune.json").read_text())
    for layer, kept in meta["experts"]["kept"].items():
        assert len(kept) == 2
        for n, p in experts.items():
            if f"layers.{layer}." in n:  # the kept experts' weights, unchanged
                assert torch.equal(p, dense.get_parameter(n)[kept])
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_reap_saliency_by_hand_on_mixtral():
    """REAP and frequency of layer 0 against a hand computation of Mixtral's router
    (softmax, top-2, renormalised) and experts (down(silu(gate x) * up x))."""
    import torch.nn.functional as F

    from llmprune.structured.experts import expert_saliency

    model = tiny_family_model("mixtral")
    moe = model.model.layers[0].mlp
    grabbed = []
    handle = moe.register_forward_pre_hook(lambda _m, args: grabbed.append(args[0].detach()))
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    scores = expert_saliency(model, ids, batch_size=4, progress=False)
    handle.remove()
    x = grabbed[0].reshape(-1, 64).double()
    probs = F.softmax(x @ moe.gate.weight.detach().double().T, dim=-1)
    top, idx = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    gate_up = moe.experts.gate_up_proj.detach().double()
    down = moe.experts.down_proj.detach().double()
    for j in range(4):
        rows = (idx == j).any(-1)
        g = (top * (idx == j)).sum(-1)[rows]
        gate, up = (x[rows] @ gate_up[j].T).chunk(2, dim=-1)
        f = (F.silu(gate) * up) @ down[j].T
        assert scores["frequency"][0][j] == rows.sum()
        want = (g * f.norm(dim=-1)).sum() / rows.sum()
        assert torch.allclose(scores["reap"][0][j], want, rtol=1e-4), j


def test_experts_refuses_dense_models_and_too_few_experts(checkpoint_dir, text_file, tmp_path,
                                                          family_dirs, capsys):
    out = tmp_path / "out"
    assert main(["-q", "experts", "--model", str(checkpoint_dir), "--keep-ratio", "0.5",
                 "--calib-data", str(text_file), "--output", str(out)]) == 2
    assert "no mixture-of-experts layers" in capsys.readouterr().err
    # mixtral picks 2 experts per token: keeping 1 of 4 cannot work
    assert main(["-q", "experts", "--model", str(family_dirs("mixtral")), "--keep-ratio", "0.25",
                 "--calib-data", str(text_file), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fewer than the 2 the router picks" in err and err.count("\n") == 1
    assert not out.exists()


def test_owl_on_moe_allocates_per_layer_and_prunes_every_expert():
    """OWL's outlier ratios count the experts' weights with their routed activations; each
    layer's experts and attention get that layer's sparsity, the average stays the target."""
    import llmprune
    from llmprune.recipe import PruneRecipe

    model = tiny_family_model("mixtral")
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))
    report = llmprune.prune(model, PruneRecipe("wanda", sparsity=0.5, allocation="owl"),
                            calib_ids=ids, progress=False)
    layer_sparsity = report.allocation["layer_sparsity"]
    assert len(set(layer_sparsity)) == 2 and abs(report.sparsity - 0.5) < 0.01
    for i, layer in enumerate(model.model.layers):
        for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj,
                  layer.self_attn.q_proj.weight):
            for w in (p if p.dim() == 3 else p[None]):
                got = float((w == 0).float().mean())
                assert abs(got - layer_sparsity[i]) <= 1 / w.shape[-1], (i, got)


def _never_route_to(moe, expert: int):
    """A forward hook on Mixtral's router that keeps its top-2 off ``expert`` (its logit set to
    -inf before the softmax and top-k, as the router computes them)."""
    def hook(router, args, _out):
        logits = torch.nn.functional.linear(args[0].reshape(-1, router.hidden_dim), router.weight)
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = probs.topk(router.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx
    return moe.gate.register_forward_hook(hook)


def _expert_hessians(model, ids, calibrate: str) -> dict[str, object]:
    """The SparseGPT statistics of every input group of Mixtral's layer 0, one dense pass."""
    from llmprune.engine.calibrate import collect_layer_stats
    from llmprune.models.experts import expert_linears
    from llmprune.solvers import get_solver

    adapter = adapter_for(model)
    layers = adapter.layers(model)
    with expert_linears(layers, adapter.experts, model.config, calibrate):
        inputs = capture_inputs(model, adapter, ids, EngineOptions(batch_size=4))
        groups = layer_groups(adapter, layers[0], inputs)
        stats = collect_layer_stats(layers[0], list(groups), inputs, get_solver("sparsegpt"),
                                    torch.device("cpu"))
    return {g[0]: s for g, s in zip(groups, stats)}


def test_moe_calibrate_all_gives_every_expert_every_token():
    """--moe-calibrate all on a tiny Mixtral whose router never picks expert 3: each expert's
    gate/up Hessian is X^T X over every token entering the experts, its down Hessian Z^T Z with
    Z = silu(x W_gate^T) * (x W_up^T) of every token (both by hand, float64); expert 3 included.
    With routed calibration expert 3 gets no token. Two runs give identical statistics."""
    import torch.nn.functional as F

    model = tiny_family_model("mixtral")
    moe = model.model.layers[0].mlp
    handle = _never_route_to(moe, 3)
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(4))
    xs = []
    grab = moe.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids[:4])
        model(input_ids=ids[4:])
    grab.remove()
    x = torch.cat(xs).reshape(-1, 64).double()  # [T, hidden]: every token entering the experts
    routed = _expert_hessians(model, ids, "routed")
    assert routed["mlp.experts.expert_linears.gate_up_proj.3"].tokens == 0
    stats = _expert_hessians(model, ids, "all")
    again = _expert_hessians(model, ids, "all")
    handle.remove()
    gate_up = moe.experts.gate_up_proj.detach().double()  # [E, 2 * inter, hidden]
    for e in range(4):
        h = stats[f"mlp.experts.expert_linears.gate_up_proj.{e}"]
        assert h.tokens == x.shape[0]
        assert torch.allclose(h.full().double(), x.T @ x, rtol=1e-4, atol=1e-3), e
        gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
        z = F.silu(gate) * up  # [T, inter]
        h = stats[f"mlp.experts.expert_linears.down_proj.{e}"]
        assert h.tokens == x.shape[0]
        assert torch.allclose(h.full().double(), z.T @ z, rtol=1e-4, atol=1e-3), e
    assert all(torch.equal(stats[k].full(), again[k].full()) for k in stats)


@pytest.mark.parametrize("model_type", sorted(set(MOE) - {"llama4_text"}))
def test_moe_calibrate_all_counts_every_token_in_every_family(model_type):
    """In the first MoE layer of each family, one fused expert parameter: with routed
    calibration its experts see, together, tokens x experts-per-token statistics rows (the
    router's top-k); with "all" every expert sees every token."""
    from llmprune.engine.calibrate import collect_layer_stats, run_layer
    from llmprune.models.experts import expert_linears
    from llmprune.solvers import get_solver

    model = tiny_family_model(model_type)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(7))
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    top_k = model.config.num_experts_per_tok
    for calibrate in ("routed", "all"):
        with expert_linears(layers, adapter.experts, model.config, calibrate):
            inputs = capture_inputs(model, adapter, ids, EngineOptions(batch_size=2))
            for layer in layers:
                groups = layer_groups(adapter, layer, inputs)
                first = sorted({g[0].rpartition(".")[0] for g in groups
                                if ".expert_linears." in g[0]})[:1]
                if first:
                    break
                run_layer(layer, inputs)
            experts = [g for g in groups if g[0].rpartition(".")[0] == first[0]]
            stats = collect_layer_stats(layer, experts, inputs, get_solver("wanda"),
                                        torch.device("cpu"))
        tokens = [s.tokens for s in stats]
        assert len(tokens) == 4, model_type
        if calibrate == "routed":
            assert sum(tokens) == ids.numel() * top_k, (model_type, tokens)
        else:
            assert tokens == [ids.numel()] * 4, (model_type, tokens)


def test_moe_calibrate_all_keeps_the_real_routing_and_prunes_every_expert():
    """The experts module's output under calibrate="all", watched by a hook, is the real
    routing's; pruning with moe_calibrate="all" calibrates an expert the router never picks
    (routed: pruned by magnitude instead) and gives the same weights twice."""
    import llmprune
    from llmprune.models.experts import expert_linears
    from llmprune.recipe import PruneRecipe

    def pruned(calibrate):
        model = tiny_family_model("mixtral")
        handles = [_never_route_to(layer.mlp, 3) for layer in model.model.layers]
        ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(5))
        report = llmprune.prune(model, PruneRecipe("sparsegpt", sparsity=0.5, batch_size=4,
                                                   moe_calibrate=calibrate),
                                calib_ids=ids, progress=False)
        for h in handles:
            h.remove()
        return model, report

    model = tiny_family_model("mixtral")
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = moe(x)
        with expert_linears(model.model.layers, 4, model.config, "all"):
            watched = moe.experts.expert_linears.gate_up_proj[0]
            hook = watched.register_forward_pre_hook(lambda *_: None)
            got = moe(x)
            hook.remove()
    # the per-expert linears sum the routed experts in another order than the fused forward, so
    # equal up to float32 rounding (the thread count changes the order)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    routed, report = pruned("routed")
    assert any(".gate_up_proj.3" in n for n in report.uncalibrated)
    a, report = pruned("all")
    assert report.uncalibrated == []
    b, _ = pruned("all")
    sa, sb, sr = a.state_dict(), b.state_dict(), routed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(sa[key][3], sr[key][3])  # Hessian-based, not magnitude
    for w in sa[key]:
        assert abs(int((w == 0).sum()) - w.numel() // 2) <= w.shape[0]


def test_moe_calibrate_is_checked_and_recorded_only_when_not_the_default(capsys, tmp_path):
    from llmprune.core.errors import UserError
    from llmprune.recipe import PruneRecipe

    with pytest.raises(UserError, match="--moe-calibrate must be routed or all"):
        PruneRecipe("wanda", sparsity=0.5, moe_calibrate="some")
    assert "moe_calibrate" not in PruneRecipe("wanda", sparsity=0.5).to_dict()
    data = PruneRecipe("wanda", sparsity=0.5, moe_calibrate="all").to_dict()
    assert data["moe_calibrate"] == "all" and PruneRecipe.from_dict(data).moe_calibrate == "all"


@pytest.mark.parametrize("model_type", ["gpt_oss", "llama4_text", "mixtral", "qwen3_moe"])
def test_stream_prunes_fused_experts_as_in_memory(model_type, family_dirs, text_file, tmp_path):
    """--stream prunes every expert, bit-identical to the in-memory run (with --moe-calibrate
    all too), on checkpoints that store their experts fused as the model holds them (gpt_oss,
    llama4_text) and on those that store them one by one, which transformers fuses on load
    (mixtral, qwen3_moe): fused a layer at a time as transformers fuses them."""
    src = str(family_dirs(model_type))
    calib = ["--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32",
             "--moe-calibrate", "all"]
    run = lambda *args: main(["-q", *map(str, args)])  # noqa: E731
    mem, stream = tmp_path / "mem", tmp_path / "stream"
    assert run("sparsegpt", "--model", src, "--sparsity", "0.5", *calib, "--output", mem) == 0
    assert run("sparsegpt", "--model", src, "--sparsity", "0.5", *calib, "--stream",
               "--output", stream) == 0
    a, b = _state(mem), _state(stream)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    experts = [w for w in a.values() if w.dim() == 3 and w.shape[0] == 4]
    assert experts and all(abs(float((w == 0).float().mean()) - 0.5) < 0.02 for w in experts)
    # the streamed checkpoint's per-expert masks become the fused parameters' on export
    assert run("export", stream, "--format", "compact", "--output", tmp_path / "compact") == 0
    meta = json.loads((tmp_path / "compact" / "llmprune.json").read_text())
    stacked = [n for n, info in meta["tensors"].items() if "transposed" in info]
    assert stacked and all(meta["tensors"][n]["encoding"] == "bitmask" for n in stacked)
    got = llmprune.load_pretrained(str(tmp_path / "compact"), sparse="dense").state_dict()
    assert got.keys() == a.keys() and all(same_bits(got[k], a[k]) for k in a)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_compact_export_encodes_every_expert(model_type, family_dirs, text_file, tmp_path):
    """--export compact of a pruned MoE model (50% and 2:4): every fused expert parameter is
    stored encoded (bitmask / N:M over its experts' matrices, gpt_oss's [experts, in, out]
    included), the export is smaller than the dense one, load_pretrained decodes every weight
    bit for bit as the dense export holds it, and the dense export loads with plain
    from_pretrained."""
    from transformers import AutoModelForCausalLM

    src = str(family_dirs(model_type))
    calib = ["--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32"]
    for target, encoding in ((["--sparsity", "0.5"], "bitmask"), (["--pattern", "2:4"], "nm")):
        dense, packed = tmp_path / f"dense{encoding}", tmp_path / f"compact{encoding}"
        assert main(["-q", "wanda", "--model", src, *target, *calib, "--output",
                     str(dense)]) == 0
        assert main(["-q", "wanda", "--model", src, *target, *calib, "--export", "compact",
                     "--output", str(packed)]) == 0
        model, info = AutoModelForCausalLM.from_pretrained(dense, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        want = model.state_dict()
        meta = json.loads((packed / "llmprune.json").read_text())
        assert meta["format_version"] == 3
        experts = {n: i for n, i in meta["tensors"].items() if len(i["shape"]) == 3}
        assert experts and all(i["encoding"] == encoding and i["bytes"] < i["dense_bytes"]
                               and i["transposed"] == (model_type == "gpt_oss")
                               for n, i in experts.items() if not n.endswith("_bias"))
        on_disk = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors")  # noqa: E731
                                if "masks" not in p.name)
        assert on_disk(packed) < 0.8 * on_disk(dense)
        got = llmprune.load_pretrained(str(packed), sparse="dense").state_dict()
        assert got.keys() == want.keys() and all(same_bits(got[k], want[k]) for k in want)
        assert main(["-q", "inspect", str(packed)]) == 0  # 2:4 holds in every expert


def test_compact_export_refuses_experts_saved_one_by_one(family_dirs, text_file, tmp_path,
                                                          capsys):
    """A dense Mixtral output stores its experts one by one (transformers fuses them on load):
    ``llmprune export --format compact`` refuses it in one line, before writing anything."""
    dense = tmp_path / "dense"
    assert main(["-q", "wanda", "--model", str(family_dirs("mixtral")), "--sparsity", "0.5",
                 "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32",
                 "--output", str(dense)]) == 0
    capsys.readouterr()
    assert main(["-q", "export", str(dense), "--format", "compact", "--output",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "converted by transformers on load" in err and "--export compact" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_experts_saved_one_by_one_are_fused_as_transformers_loads_them(tmp_path):
    """checkpoint_keys + fuse on a Mixtral of 12 experts saved one by one (w1 = gate, w3 = up,
    w2 = down per expert): layer 0's fused parameters are the experts stacked in numeric order
    (expert 10 after 9), gate rows before up rows, as the model from_pretrained holds them."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmprune.io.loading import checkpoint_keys, fuse
    from .tiny_families import tiny_config

    config = tiny_config("mixtral")
    config.num_local_experts = 12
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    files = load_file(tmp_path / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    renames, fusions = checkpoint_keys(model, files)
    prefix = "model.layers.0.block_sparse_moe.experts"
    w = lambda e, n: files[f"{prefix}.{e}.{n}.weight"]  # noqa: E731
    want = {"gate_up_proj": torch.stack([torch.cat([w(e, "w1"), w(e, "w3")]) for e in range(12)]),
            "down_proj": torch.stack([w(e, "w2") for e in range(12)])}
    for param, tensor in want.items():
        target = f"model.layers.0.mlp.experts.{param}"
        got = fuse(fusions[target], files.__getitem__)
        assert torch.equal(got, tensor) and torch.equal(got, model.get_parameter(target))
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert renames[router] == "model.layers.0.mlp.gate.weight"
    assert not any(k in renames for f in fusions.values() for ks in f.sources.values() for k in ks)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_masks_file_names_every_expert_through_exports(model_type, family_dirs, text_file,
                                                       tmp_path):
    """The masks file of a pruned MoE checkpoint holds one mask per expert with its [out, in]
    shape (read here from the fused parameter, [E, out, in] or gpt_oss's [E, in, out]), each
    equal to the pruned weight's nonzeros; a dense export of that checkpoint and a dense export
    of its compact export keep the same masks, shapes included."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from llmprune.core.bits import unpack_bits

    src = str(family_dirs(model_type))
    calib = ["--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32"]
    pruned, compact = tmp_path / "pruned", tmp_path / "compact"
    assert main(["-q", "wanda", "--model", src, "--sparsity", "0.5", *calib,
                 "--output", str(pruned)]) == 0
    outs = [pruned, tmp_path / "dense"]
    assert main(["-q", "export", str(pruned), "--format", "dense", "--output", str(outs[1])]) == 0
    if model_type == "gpt_oss":  # (mixtral's checkpoint stores its experts one by one: a compact
        # export of it is refused: test_compact_export_refuses_experts_saved_one_by_one)
        outs.append(tmp_path / "dense_of_compact")
        assert main(["-q", "export", str(pruned), "--format", "compact",
                     "--output", str(compact)]) == 0
        assert main(["-q", "export", str(compact), "--format", "dense",
                     "--output", str(outs[2])]) == 0

    def masks(out):
        with safe_open(str(out / "llmprune_masks.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["shapes"])

    model = AutoModelForCausalLM.from_pretrained(pruned)
    bits, shapes = masks(pruned)
    experts = 0
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() != 3 or p.shape[0] != 4 or pname.endswith("bias"):
                continue
            for e in range(4):
                w = p[e].T if model_type == "gpt_oss" else p[e]  # [out, in]
                key = f"{module_name}.expert_linears.{pname}.{e}.weight"
                assert shapes[key] == list(w.shape)
                keep = unpack_bits(bits[key], w.shape[1])
                assert torch.equal(keep, w != 0)
                experts += 1
    assert experts == 2 * 2 * 4  # 2 layers x (gate_up, down) x 4 experts
    for out in outs[1:]:
        got, got_shapes = masks(out)
        assert got_shapes == shapes and got.keys() == bits.keys()
        assert all(torch.equal(got[k], bits[k]) for k in bits)
