"""The ADMM solver against independent computations: the weights on its final mask against a
float64 least-squares solve of each row's masked problem, its patterns counted exactly, and its
layer loss against SparseGPT's on the same correlated inputs."""

import numpy as np
import pytest
import torch

import llmprune
from llmprune.core.errors import UserError
from llmprune.core.masks import nm_violations
from llmprune.core.sparsity import Sparsity
from llmprune.solvers import get_solver
from llmprune.solvers.admm import admm_prune
from llmprune.solvers.sparsegpt import sparsegpt_prune

from tests.conftest import tiny_model

TWO_FOUR = Sparsity.parse(None, "2:4")


def correlated_layer(out_f=12, in_f=32, tokens=256, seed=0):
    """W [out, in] and H = X^T X for inputs X with correlated columns of unequal scale."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) * 0.3 + torch.eye(in_f)
    scale = torch.rand(in_f, generator=g) * 3 + 0.1
    x = (torch.randn(tokens, in_f, generator=g) @ mix) * scale
    w = torch.randn(out_f, in_f, generator=g)
    return w, x.T @ x, x


def masked_lstsq(w0, h, keep, percdamp):
    """Row by row in float64 with numpy: the minimiser of (w - w0) Hd (w - w0)^T over the
    weights on the row's support, Hd = H + percdamp diag(H) (the solver's damping mapped back
    from its normalised space): Hd[S, S] w_S = (w0 Hd)_S."""
    hd = h.double().numpy()
    hd = hd + percdamp * np.diag(np.diag(hd))
    w0 = w0.double().numpy()
    out = np.zeros_like(w0)
    for r in range(w0.shape[0]):
        s = keep[r].numpy()
        rhs = (w0[r] @ hd)[s]
        out[r, s] = np.linalg.lstsq(hd[np.ix_(s, s)], rhs, rcond=None)[0]
    return torch.from_numpy(out)


def loss(w, w0, h):
    d = (w - w0).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


@pytest.mark.parametrize("target", [Sparsity("unstructured", 0.6), TWO_FOUR])
def test_weights_on_the_mask_are_the_least_squares_optimum(target):
    w0, h, _ = correlated_layer()
    w, keep = admm_prune(w0, h, target, cg_iters=64, percdamp=0.01)
    ref = masked_lstsq(w0, h, keep, 0.01)
    assert torch.equal(w == 0, ~keep) or bool(((w == 0) | keep).all())
    assert torch.allclose(w.double(), ref, rtol=1e-3, atol=1e-3)


def test_cg_steps_lower_the_loss_on_the_same_mask():
    w0, h, _ = correlated_layer(seed=1)
    target = Sparsity("unstructured", 0.7)
    w_none, keep_none = admm_prune(w0, h, target, cg_iters=0)
    w_cg, keep_cg = admm_prune(w0, h, target, cg_iters=30)
    assert torch.equal(keep_none, keep_cg)
    assert loss(w_cg, w0, h) <= loss(w_none, w0, h) * (1 + 1e-6)


@pytest.mark.parametrize("target", [Sparsity("unstructured", 0.7), TWO_FOUR])
def test_lower_layer_loss_than_sparsegpt(target):
    w0, h, _ = correlated_layer(out_f=24, in_f=64, tokens=512, seed=2)
    w_admm, _ = admm_prune(w0, h, target)
    w_sg, _, _ = sparsegpt_prune(w0, h, target, blocksize=16)
    assert loss(w_admm, w0, h) < loss(w_sg, w0, h)


def test_exact_patterns_per_linear():
    w0, h, _ = correlated_layer(out_f=30, in_f=48, seed=3)
    splits = [8, 10, 12]  # three linears reading one input (q, k, v)
    for target in (Sparsity("unstructured", 0.7), Sparsity.parse(None, "4:8"), TWO_FOUR):
        w, keep = admm_prune(w0, h, target, splits)
        assert bool((w[~keep] == 0).all())
        for wi, ki in zip(w.split(splits), keep.split(splits)):
            if target.kind == "nm":
                assert nm_violations(wi, target.n, target.m) == 0
                assert int(ki.sum()) == ki.numel() * target.n // target.m
            else:
                assert int((~ki).sum()) == round(ki.numel() * 0.7)
    w, keep = admm_prune(w0, h, Sparsity("unstructured", 0.5), per_row=True)
    assert ((~keep).sum(1) == 24).all()


def test_dead_inputs_are_pruned_first():
    w0, h, _ = correlated_layer(seed=4)
    h[:, :4] = 0.0
    h[:4, :] = 0.0  # inputs 0-3 never fire
    w, keep = admm_prune(w0, h, Sparsity("unstructured", 0.5))
    assert not bool(keep[:, :4].any()) and bool((w[:, :4] == 0).all())


def test_options_are_checked():
    with pytest.raises(UserError):
        get_solver("admm", grow_iters=30, iters=10)
    with pytest.raises(UserError):
        get_solver("admm", rho=0.0)
    with pytest.raises(UserError):
        get_solver("admm", cg_iters=-1)


def test_engine_run_on_a_tiny_model_keeps_two_of_four():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 32),
                        generator=torch.Generator().manual_seed(0))
    recipe = llmprune.PruneRecipe("admm", pattern="2:4", nsamples=4, seqlen=32,
                                  options={"iters": 6, "grow_iters": 3, "cg_iters": 5})
    report = llmprune.prune(model, recipe, calib_ids=ids, progress=False)
    assert report.sparsity == pytest.approx(0.5)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "layers" in name:
            assert nm_violations(module.weight, 2, 4) == 0
