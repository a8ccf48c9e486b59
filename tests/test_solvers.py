"""Solvers against independent computations: a hand-computed Wanda case and a dense Optimal
Brain Surgeon reference for SparseGPT that uses explicit matrix inverses instead of Cholesky
factors and lazy blocks."""

import logging

import pytest
import torch

from llmprune.core.sparsity import Sparsity
from llmprune.solvers.magnitude import magnitude_prune
from llmprune.solvers.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from llmprune.solvers.wanda import ColumnSquares, wanda_prune

HALF = Sparsity("unstructured", 0.5)
TWO_FOUR = Sparsity.parse(None, "2:4")


def test_wanda_hand_case():
    w = torch.tensor([[1.0, -2.0, 3.0, -5.0], [4.0, 3.0, -2.0, 1.0]])
    # Two tokens; column norms ||X_j||_2 = [4, 1, 2, 0.5].
    x = torch.tensor([[4.0, 0.0, 2.0, 0.3], [0.0, 1.0, 0.0, 0.4]])
    stats = ColumnSquares(torch.zeros(4))
    stats.add(x.unsqueeze(0))  # [batch, tokens, in]
    assert torch.allclose(stats.sq.sqrt(), torch.tensor([4.0, 1.0, 2.0, 0.5]))
    # Scores: row 0 = [4, 2, 6, 2.5] -> prune columns 1, 3; row 1 = [16, 3, 4, 0.5] -> 1, 3.
    res = wanda_prune(w, stats.sq, HALF)
    assert res.mask.tolist() == [[True, False, True, False], [True, False, True, False]]  # kept
    assert res.weight.tolist() == [[1.0, 0.0, 3.0, 0.0], [4.0, 0.0, -2.0, 0.0]]
    # Magnitude alone would prune row 1's columns 2 and 3 instead.
    assert magnitude_prune(w[1:], HALF).mask.tolist() == [[True, True, False, False]]


def test_wanda_hand_case_2of4():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 3.0]])
    sq = torch.tensor([1.0, 4.0, 9.0, 16.0, 1.0, 1.0, 100.0, 1.0])  # norms 1,2,3,4,1,1,10,1
    res = wanda_prune(w, sq, TWO_FOUR)  # scores 1,2,3,4 | 2,1,10,3
    assert res.mask.tolist() == [[False, False, True, True, False, False, True, True]]


def obs_reference(w, h, target, blocksize, percdamp):
    """Dense OBS, float64, from the definitions: every step inverts the Hessian of the columns
    not yet processed, R = {j, ..., n-1}, explicitly. Pruning w_rj updates row r by
    -w_rj / [H_R^-1]_jj * [H_R^-1]_{j,R}. Saliency is w^2 / [H_R^-1]_jj, chosen per block of
    ``blocksize`` columns (unstructured) or per group of M columns (N:M)."""
    w = w.double().clone()
    h = h.double()
    n = h.shape[0]
    h = h + percdamp * torch.diag(h).mean() * torch.eye(n, dtype=torch.float64)
    inv_diag = torch.tensor([torch.linalg.inv(h[c:, c:])[0, 0] for c in range(n)],
                            dtype=torch.float64)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for j in range(n):
        if target.kind == "unstructured" and j % blocksize == 0:
            blk = slice(j, min(j + blocksize, n))
            sal = (w[:, blk] ** 2 / inv_diag[blk]).flatten()
            k = int(round(sal.numel() * target.ratio))
            idx = torch.argsort(sal)[:k]
            mb = torch.zeros_like(sal, dtype=torch.bool)
            mb[idx] = True
            mask[:, blk] = mb.view(w.shape[0], -1)
        if target.kind == "nm" and j % target.m == 0:
            grp = slice(j, j + target.m)
            sal = w[:, grp] ** 2 / inv_diag[grp]
            idx = torch.argsort(sal, dim=1)[:, : target.m - target.n]
            mask[:, grp] = torch.zeros_like(sal, dtype=torch.bool).scatter_(1, idx, True)
        hinv_r = torch.linalg.inv(h[j:, j:])  # [H_R^-1], R = {j..n-1}
        for r in torch.nonzero(mask[:, j]).flatten().tolist():
            w[r, j:] -= w[r, j] / hinv_r[0, 0] * hinv_r[0, :]
    return w, mask


@pytest.mark.parametrize("target,blocksize", [(HALF, 8), (HALF, 5), (HALF, 32),
                                              (TWO_FOUR, 8), (Sparsity.parse(None, "4:8"), 16)])
def test_sparsegpt_matches_dense_obs(target, blocksize):
    torch.manual_seed(0)
    rows, cols = 6, 24
    x = torch.randn(200, cols) @ torch.randn(cols, cols) * 0.3  # correlated inputs
    h = x.T @ x
    w = torch.randn(rows, cols)
    got, keep, frac = sparsegpt_prune(w, h, target, blocksize=blocksize, percdamp=0.01)
    ref, ref_pruned = obs_reference(w, h, target, blocksize, 0.01)
    assert frac == 0.01
    assert torch.equal(~keep, ref_pruned)
    assert (got[~keep] == 0).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    # The OBS updates really changed the kept weights (this is not plain masking).
    assert not torch.allclose(got[keep], w[keep])


def test_sparsegpt_stacked_rows_equal_separate_solves():
    torch.manual_seed(1)
    x = torch.randn(300, 32)
    h = x.T @ x
    a, b = torch.randn(8, 32), torch.randn(4, 32)
    stacked, smask, _ = sparsegpt_prune(torch.cat([a, b]), h, HALF, row_splits=[8, 4],
                                        blocksize=16)
    sa, ma, _ = sparsegpt_prune(a, h, HALF, blocksize=16)
    sb, mb, _ = sparsegpt_prune(b, h, HALF, blocksize=16)
    assert torch.equal(smask, torch.cat([ma, mb]))
    torch.testing.assert_close(stacked, torch.cat([sa, sb]))
    # Each linear gets exactly its own sparsity.
    assert int((~smask[:8]).sum()) == 8 * 32 // 2 and int((~smask[8:]).sum()) == 4 * 32 // 2


def test_sparsegpt_retries_damping_when_cholesky_fails(caplog):
    h = -torch.eye(8)  # negative definite: every factorisation at small damping fails
    h[0, 0] = 100.0
    with caplog.at_level(logging.WARNING):
        u, frac = inverse_hessian_factor(h, 0.01)
    assert frac > 0.01
    assert "Cholesky failed" in caplog.text
    hd = h + frac * torch.diag(h).mean() * torch.eye(8)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(hd), rtol=1e-4, atol=1e-5)


def test_sparsegpt_dead_inputs_are_zeroed():
    torch.manual_seed(2)
    x = torch.randn(100, 16)
    x[:, 3] = 0
    w = torch.randn(4, 16)
    got, keep, _ = sparsegpt_prune(w, x.T @ x, TWO_FOUR, blocksize=8)
    assert (got[:, 3] == 0).all() and not keep[:, 3].any()
    assert ((got != 0).view(4, 4, 4).sum(-1) <= 2).all()


@pytest.mark.parametrize("n", [40, 256, 600])
def test_hessian_lower_block_accumulation_is_x_transpose_x(n, monkeypatch):
    """Hessian.add accumulates only the lower block triangle; full() gives the whole X^T X,
    exactly symmetric, against a float64 product (blocks of 256 rows, and of 64 here too)."""
    import llmprune.solvers.sparsegpt as sg

    for block in (256, 64):
        monkeypatch.setattr(sg, "HESSIAN_BLOCK", block)
        torch.manual_seed(n)
        xs = [torch.randn(3, 50, n) for _ in range(3)]
        hs = sg.Hessian(torch.zeros(n, n))
        for x in xs:
            hs.add(x)
        if n > block:  # the strict upper block triangle was never written
            assert float(hs.h[:block, block:].abs().max()) == 0.0
        full = hs.full()
        assert full is hs.h and hs.tokens == 450
        assert torch.equal(full, full.T)
        ref = sum(x.reshape(-1, n).double().T @ x.reshape(-1, n).double() for x in xs)
        torch.testing.assert_close(full.double(), ref, rtol=1e-5, atol=1e-3)
        hs.add(xs[0])  # adding after full() and mirroring again stays right
        ref = ref + xs[0].reshape(-1, n).double().T @ xs[0].reshape(-1, n).double()
        torch.testing.assert_close(hs.full().double(), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("n,block", [(5, 128), (128, 128), (300, 64), (515, 128), (257, 16)])
def test_inverse_hessian_factor_in_place_against_float64(n, block, monkeypatch):
    """The blocked in-place factorisation (flip, Cholesky, triangular inverse, flip) gives an
    upper U with U^T U = (H + lambda I)^-1, against float64 linalg.inv; inplace=True returns
    ``h``'s own buffer, and inplace=False leaves ``h`` as it was."""
    import llmprune.solvers.sparsegpt as sg

    monkeypatch.setattr(sg, "FACTOR_BLOCK", block)
    torch.manual_seed(n)
    x = torch.randn(2 * n + 7, n) @ (torch.eye(n) + 0.1 * torch.randn(n, n))
    h = x.T @ x
    keep = h.clone()
    u, frac = inverse_hessian_factor(h, 0.01)
    assert torch.equal(h, keep) and frac == 0.01
    hd = h.double() + 0.01 * torch.diag(h.double()).mean() * torch.eye(n, dtype=torch.float64)
    want = torch.linalg.inv(hd)
    assert torch.equal(u, u.triu())
    got = u.double().T @ u.double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    ptr = h.data_ptr()
    u2, _ = inverse_hessian_factor(h, 0.01, inplace=True)
    assert u2.data_ptr() == ptr
    torch.testing.assert_close(u2, u, rtol=0, atol=0)


def test_inverse_hessian_factor_retry_restores_h_from_the_upper_triangle(monkeypatch, caplog):
    """A failure in a late block (after earlier blocks were factored in place) is undone from the
    untouched upper triangle and the saved diagonal blocks: the retried factor is that of the
    original H with the larger damping."""
    import llmprune.solvers.sparsegpt as sg

    monkeypatch.setattr(sg, "FACTOR_BLOCK", 16)
    torch.manual_seed(3)
    n = 70
    x = torch.randn(200, n)
    h = x.T @ x
    h[0, 0] = -30.0  # row 0 is the *last* after the reversal, so blocks 0-3 succeed first
    with caplog.at_level(logging.WARNING):
        u, frac = inverse_hessian_factor(h, 0.01)
    assert frac > 0.01 and "Cholesky failed" in caplog.text
    hd = h.double() + frac * torch.diag(h.double()).mean() * torch.eye(n, dtype=torch.float64)
    want = torch.linalg.inv(hd)
    got = u.double().T @ u.double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.parametrize("target", [HALF, TWO_FOUR, Sparsity.parse(0.3, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wanda_rows_in_place_equals_whole_matrix(target, dtype):
    """The engine's Wanda (in place, a few rows at a time, packed keep bits) prunes exactly
    what the whole-matrix wanda_prune does: rows are compared on their own."""
    from llmprune.core.bits import pack_bits
    from llmprune.solvers.wanda import wanda_prune_rows

    torch.manual_seed(5)
    w = torch.randn(37, 24).to(dtype)
    sq = torch.rand(24) * 10
    ref = wanda_prune(w.float(), sq, target)
    got_w = w.clone()
    res = wanda_prune_rows(got_w, sq, target, chunk_bytes=5 * 24 * 4)  # 5 rows per chunk
    assert res.weight.data_ptr() == got_w.data_ptr() and res.mask is None
    assert torch.equal(res.keep_bits, pack_bits(ref.mask))
    assert torch.equal(got_w, ref.weight.to(dtype))
    assert int((got_w == 0).sum()) >= int((~ref.mask).sum())


@pytest.mark.parametrize("target", [HALF, TWO_FOUR])
def test_sparsegpt_group_one_linear_at_a_time_equals_stacked(target, monkeypatch):
    """Above STACK_BYTES the engine's SparseGPT sweeps a group's linears one at a time with the
    group's one factor of H^-1; that is the same computation as sweeping them stacked."""
    import llmprune.solvers.sparsegpt as sg

    torch.manual_seed(7)
    x = torch.randn(400, 48) @ (torch.eye(48) + 0.2 * torch.randn(48, 48))
    weights = [torch.randn(16, 48), torch.randn(8, 48), torch.randn(8, 48)]
    solver = sg.SparseGPT(blocksize=16)

    def run():
        stats = solver.new_stats(48, torch.device("cpu"))
        stats.add(x)
        return list(solver.solve_group(weights, stats, target, ["a", "b", "c"]))

    stacked = run()
    monkeypatch.setattr(sg, "STACK_BYTES", 0)
    separate = run()
    for a, b in zip(stacked, separate):
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    ref, ref_mask, _ = sparsegpt_prune(torch.cat(weights), x.T @ x, target, [16, 8, 8], 16)
    assert torch.equal(torch.cat([b.mask for b in separate]), ref_mask)
