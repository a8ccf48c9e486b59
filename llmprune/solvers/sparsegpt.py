"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"), Algorithm 1.

For a linear layer with weight W [out, in] and calibration inputs X [tokens, in], the layer-wise
objective is ||W X^T - W' X^T||^2 with Hessian H = X^T X (Sec. 3). Damping adds
lambda = percdamp * mean(diag H) to the diagonal. Columns are processed left to right; pruning
weight w_i (or keeping it) is followed by the Optimal Brain Surgeon update of the not yet
processed columns of the same row (Eq. 3):

    delta_{R} = -(w_i / [H_R^{-1}]_{ii}) * [H_R^{-1}]_{i, R},    R = {i, ..., in-1}

All the [H_R^{-1}] rows are read off one upper Cholesky factor U of H^{-1}: row i of U equals
[H_R^{-1}]_{i,R} / sqrt([H_R^{-1}]_{ii}) (Sec. 3.2, "Hessian synchronization"), so the update is
err_i = (w_i - q_i) / U_ii and W_{:, i:} -= err_i U_{i, i:}. Updates are applied lazily in blocks of
``blocksize`` columns (Sec. 3.3). The mask is chosen adaptively at the start of every block by the
OBS saliency w^2 / U_ii^2 (Sec. 3.4, "adaptive mask selection"); for N:M it is chosen at the start of
every group of M columns among those M (Sec. 3.5).

Rows of several linears that read the same input (q/k/v) are swept together with one Hessian
and one Cholesky factor; unstructured selection is still done per linear, so each linear gets
exactly its own sparsity. This is the same computation as sweeping each linear on its own.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..core.errors import UserError
from ..core.flags import positive_int
from ..core.masks import lowest_k_mask, n_pruned
from ..core.sparsity import Sparsity
from .base import STATS_DTYPE, Solved, SolverBase, option, register

log = logging.getLogger(__name__)

DEFAULT_PERCDAMP = 0.01
DEFAULT_BLOCKSIZE = 128
HESSIAN_BLOCK = 256  # rows per block of the lower-triangular X^T X accumulation
THREADED_FACTOR_MIN = 1024
MAX_DAMP_RETRIES = 6
# a group's rows are swept in one float32 copy up to this size, else one linear at a time
STACK_BYTES = 64 << 20


@dataclass
class Hessian:
    """Running sum X^T X over calibration tokens, float32, [in, in].

    H is symmetric, so :meth:`add` accumulates only its lower block triangle: row block
    ``[i0, i1)`` (``HESSIAN_BLOCK`` rows) gets X[:, i0:i1]^T X[:, :i1]. For a 1536-wide input
    that is 21 of 36 blocks, and X^T X costs about as much as a dense forward pass of the layer
    (eval/bench_core.py breakdown), so this is the calibration pass's largest saving.
    :meth:`full` mirrors the lower triangle into the upper one, in place, before a solve. The
    solve (:meth:`SparseGPT.solve_group`) then consumes the buffer.
    Partial sums (another process's, :mod:`llmprune.distributed`) add up block by block alike.
    """

    h: torch.Tensor
    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.dtype != STATS_DTYPE:
            x = x.to(STATS_DTYPE)
        n = x.shape[1]
        if n <= HESSIAN_BLOCK:
            self.h.addmm_(x.T, x)
        else:
            for i0 in range(0, n, HESSIAN_BLOCK):
                i1 = min(i0 + HESSIAN_BLOCK, n)
                self.h[i0:i1, :i1].addmm_(x[:, i0:i1].T, x[:, :i1])
        self.tokens += x.shape[0]

    def full(self) -> torch.Tensor:
        """H, symmetric: the upper triangle copied from the lower one (in place; copying again
        after more :meth:`add` calls is correct too). No [in, in] temporary."""
        h, n = self.h, self.h.shape[0]
        for i0 in range(0, n, HESSIAN_BLOCK):
            i1 = min(i0 + HESSIAN_BLOCK, n)
            diag = h[i0:i1, i0:i1]  # exactly symmetric, whatever the GEMM's rounding
            diag.copy_(diag.tril() + diag.tril(-1).T)
            if i1 < n:
                h[i0:i1, i1:] = h[i1:, i0:i1].T
        return h


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device, enabled: bool = True):
    """The solve issues thousands of tiny ops (several per column). On a CPU, intra-op threads
    add a barrier per op, which costs milliseconds when another process holds a core (measured on
    the 2-core machine: 8 ms instead of 0.08 ms per op, and 0.65 s instead of 3 ms for a 576-wide
    cholesky_inverse). One thread is never much slower at these sizes. The factorisation of a
    wide Hessian (>= ``THREADED_FACTOR_MIN`` inputs, n^3/3 multiply-adds) keeps every thread."""
    if device.type != "cpu" or not enabled:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


FACTOR_BLOCK = 128  # columns per block of the in-place Cholesky factorisation and inversion


def _flip_inplace(a: torch.Tensor, block: int = 256) -> None:
    """``a <- J a J`` (rows and columns reversed) in place, with ``block`` rows of temporary."""
    n = a.shape[0]
    half = n // 2
    for i0 in range(0, half, block):
        i1 = min(i0 + block, half)
        top = a[i0:i1].flip(0, 1)  # a copy
        a[i0:i1] = a[n - i1:n - i0].flip(0, 1)
        a[n - i1:n - i0] = top
    if n % 2:
        a[half] = a[half].flip(0)


def _mirror_upper_to_lower(a: torch.Tensor, block: int) -> None:
    n = a.shape[0]
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        a[i1:, i0:i1] = a[i0:i1, i1:].T


def _cholesky_inplace(a: torch.Tensor, block: int = FACTOR_BLOCK) -> bool:
    """Lower Cholesky factor of the symmetric ``a``, written over its lower triangle (right-looking
    blocked algorithm: factor a diagonal block, solve the panel below it, update the trailing lower
    triangle). The strict upper triangle *outside* the diagonal blocks is never written, so it
    still holds the input there; that is what lets a failed attempt be undone without a copy of
    ``a``. Returns False (``a`` partly overwritten) when a block is not positive definite."""
    n = a.shape[0]
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        ljj, info = torch.linalg.cholesky_ex(a[j0:j1, j0:j1])
        if int(info) != 0:
            return False
        a[j0:j1, j0:j1] = ljj  # zeros above the diagonal of this block
        if j1 == n:
            break
        # panel L21 = A21 L11^-T, i.e. L21 L11^T = A21
        a[j1:, j0:j1] = torch.linalg.solve_triangular(ljj.T, a[j1:, j0:j1], upper=True,
                                                      left=False)
        panel = a[j1:, j0:j1]
        for i0 in range(j1, n, block):  # A22 -= L21 L21^T, lower block triangle only
            i1 = min(i0 + block, n)
            a[i0:i1, j1:i1].addmm_(panel[i0 - j1:i1 - j1], panel[:i1 - j1].T, alpha=-1.0)
    return True


def _invert_lower_inplace(a: torch.Tensor, block: int = FACTOR_BLOCK) -> None:
    """``a <- a^-1`` for a lower-triangular ``a`` with zeros above the diagonal, in place, by
    block columns from the right: for L = [[A, 0], [B, C]], L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]],
    with C^-1 already in place. Temporaries: one [n, block] panel."""
    n = a.shape[0]
    starts = list(range(0, n, block))
    for j0 in reversed(starts):
        j1 = min(j0 + block, n)
        ajj = a[j0:j1, j0:j1].clone()
        if j1 < n:
            t = torch.linalg.solve_triangular(ajj, a[j1:, j1:] @ a[j1:, j0:j1], upper=False,
                                              left=False)  # C^-1 B A^-1
            a[j1:, j0:j1] = t.neg_()
        eye = torch.eye(j1 - j0, dtype=a.dtype, device=a.device)
        a[j0:j1, j0:j1] = torch.linalg.solve_triangular(ajj, eye, upper=False)


def inverse_hessian_factor(h: torch.Tensor, percdamp: float, inplace: bool = False
                           ) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + lambda I)^{-1} (U^T U = (H + lambda I)^{-1}), with
    lambda = percdamp * mean(diag H).

    With J the reversal permutation and J H J = L L^T, U = J L^{-1} J: one Cholesky and one
    triangular inverse instead of Cholesky, inverse and a second Cholesky.
    If the factorisation fails (H numerically singular), lambda is multiplied by 10 and retried;
    each retry is logged. Returns (U, the damping fraction actually used).

    Memory: everything happens inside one [in, in] buffer, plus [in, 128] panels: ``h`` itself
    when ``inplace`` (``h`` is then overwritten by U and returned), else a copy of it. J H J is
    formed by swapping rows in place, the blocked Cholesky leaves the strict upper triangle
    outside its diagonal blocks untouched (a retry restores H from it and from a copy of the
    diagonal blocks), and the triangular inverse is done in place. For a 28672-wide down_proj
    this is what decides whether a layer fits (eval/bench_stream.py).
    """
    a = h if inplace else h.clone()
    n = a.shape[0]
    _flip_inplace(a)  # J H J
    block = FACTOR_BLOCK
    diag_blocks = [a[j0:min(j0 + block, n), j0:min(j0 + block, n)].clone()
                   for j0 in range(0, n, block)]
    diag = a.diagonal().clone()
    diag_mean = torch.mean(diag)
    frac = percdamp
    for attempt in range(MAX_DAMP_RETRIES):
        if attempt:  # undo the failed attempt: H from the untouched upper triangle
            log.warning("Cholesky failed with damping %.3g of mean(diag H); retrying with %.3g",
                        frac, frac * 10)
            frac *= 10
            for j0, blk in zip(range(0, n, block), diag_blocks):
                a[j0:j0 + blk.shape[0], j0:j0 + blk.shape[0]] = blk
            _mirror_upper_to_lower(a, block)
        a.diagonal().copy_(diag + frac * diag_mean)
        if _cholesky_inplace(a, block):
            break
    else:
        raise RuntimeError(f"Hessian is not positive definite even with damping {frac:g}")
    del diag_blocks
    for i0 in range(0, n, block):  # the rest of H above the diagonal: L is lower triangular
        a[i0:i0 + block, i0 + block:] = 0.0
    _invert_lower_inplace(a, block)
    _flip_inplace(a)  # U = J L^-1 J, upper triangular
    return a, frac


def _mark_dead(h: torch.Tensor) -> torch.Tensor | None:
    """Inputs that never fire carry no information: their weights can go for free (Sec. 3).
    Sets H's diagonal to 1 there (in place); returns their mask, or None if there are none."""
    dead = torch.diag(h) == 0
    if not bool(dead.any()):
        return None
    h[dead, dead] = 1.0
    return dead


def _prune_rows(w: torch.Tensor, u: torch.Tensor, dead: torch.Tensor | None, target: Sparsity,
                row_splits: list[int], blocksize: int) -> torch.Tensor:
    """The column sweep over float32 ``w`` in place; returns the keep mask (True = kept)."""
    dead_pruned = None
    if dead is not None:
        dead_pruned = dead.unsqueeze(0) & (w != 0)
        w[:, dead] = 0.0
    with _one_cpu_thread(w.device):
        pruned = _sweep(w, u, target, row_splits, blocksize)
    if dead_pruned is not None:
        pruned |= dead_pruned
    return pruned.logical_not_()


def _factor(h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    with _one_cpu_thread(h.device, enabled=h.shape[0] < THREADED_FACTOR_MIN):
        return inverse_hessian_factor(h, percdamp, inplace=True)


def sparsegpt_prune(weight: torch.Tensor, h: torch.Tensor, target: Sparsity,
                    row_splits: list[int] | None = None, blocksize: int = DEFAULT_BLOCKSIZE,
                    percdamp: float = DEFAULT_PERCDAMP, inplace: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``weight`` [out, in] (rows of possibly several linears stacked, ``row_splits`` giving each
    one's row count), ``h`` [in, in] float32 = sum of x x^T.

    Returns (pruned float32 weight, keep mask (True = kept), damping fraction used). A pure
    function unless ``inplace``: then ``weight`` (float32) is pruned in place and returned, and
    ``h`` is consumed (overwritten by the factor of its inverse).
    """
    if inplace and (weight.dtype != STATS_DTYPE or h.dtype != STATS_DTYPE):
        raise ValueError("inplace sparsegpt_prune needs float32 weight and Hessian")
    w = weight if inplace else weight.to(STATS_DTYPE, copy=True)
    if not inplace:
        h = h.to(STATS_DTYPE, copy=True)
    dead = _mark_dead(h)
    u, frac = _factor(h, percdamp)
    mask = _prune_rows(w, u, dead, target, row_splits or [w.shape[0]], blocksize)
    return w, mask, frac


def _sweep(w: torch.Tensor, u: torch.Tensor, target: Sparsity, row_splits: list[int],
           blocksize: int) -> torch.Tensor:
    """Algorithm 1's column loop over ``w`` in place; returns the pruned set (True = pruned:
    the OBS selection of each block picks the weights to remove)."""
    cols = w.shape[1]
    if target.kind == "nm":
        # A group of M columns must not straddle two lazy blocks.
        blocksize = max(target.m, (blocksize // target.m) * target.m)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # [rows, count]
        u1 = u[i1:i2, i1:i2]  # [count, count]
        d = torch.diag(u1)  # [count]
        err1 = torch.zeros_like(w1)
        if target.kind == "unstructured":
            scores = w1.square() / d.square().unsqueeze(0)
            mask1 = torch.cat([
                lowest_k_mask(s.reshape(-1), n_pruned(s.numel(), target.ratio), dim=0).view_as(s)
                for s in scores.split(row_splits, dim=0)
            ])
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        _sweep_block(w1, u1, d, mask1, err1, target)
        w[:, i1:i2] = w1
        mask[:, i1:i2] = mask1
        # Lazy batch update of all later blocks (Sec. 3.3).
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)
    return mask


def _sweep_block(w1, u1, d, mask1, err1, target: Sparsity) -> None:
    """Process the columns of one block in order, in place (Algorithm 1, inner loop).

    Works on the transposed block so that each column is a contiguous row in memory.
    """
    wt = w1.T.contiguous()  # [count, rows]
    mt = mask1.T.contiguous()
    et = torch.empty_like(wt)
    for i in range(wt.shape[0]):
        if target.kind == "nm" and i % target.m == 0:
            seg = wt[i: i + target.m].square() / d[i: i + target.m].square().unsqueeze(1)
            mt[i: i + target.m] = lowest_k_mask(seg, target.m - target.n, dim=0)
        col = wt[i]
        q = col.masked_fill(mt[i], 0.0)
        e = et[i]
        torch.sub(col, q, out=e).div_(d[i])
        # OBS update of this block's remaining columns (Eq. 3, via the Cholesky row).
        wt[i:].addr_(u1[i, i:], e, alpha=-1.0)
        wt[i] = q  # exact zeros, not w - e*d rounded
    w1.copy_(wt.T)
    mask1.copy_(mt.T)
    err1.copy_(et.T)


@register
@dataclass
class SparseGPT(SolverBase):
    name = "sparsegpt"
    help = ("SparseGPT (Frantar & Alistarh 2023): OBS column sweep with lazy blocks, adaptive "
            "masks and damping.")
    needs_calibration = True
    # Measured on smollm2-135m (eval/bench_core.py, 32 x 512 tokens): bf16 forward passes with
    # fp32 Hessians and master weights gave test perplexity 31.37 vs 31.41 in fp32, in 67 s vs
    # 102 s. So `--calib-dtype auto` runs SparseGPT's forward passes in bf16 where bf16 is fast.
    auto_calib_dtype = torch.bfloat16
    blocksize: int = option(DEFAULT_BLOCKSIZE, "columns per lazy-update block",
                            parse=positive_int)
    percdamp: float = option(DEFAULT_PERCDAMP,
                             "damping added to diag(H), as a fraction of its mean")

    def __post_init__(self) -> None:
        if not (0 < self.percdamp < 1) or self.blocksize < 1:
            raise UserError("--percdamp must be in (0, 1) and --blocksize >= 1")

    def stats_bytes(self, in_features: int) -> int:
        return in_features * in_features * 4  # the Hessian, float32

    def work_bytes(self, in_features: int, group_bytes: int, largest: int) -> int:
        # the group's float32 working copy, its mask (bool) and the report's copy of it; the
        # factorisation runs inside the Hessian (counted in the statistics) with
        # [in, 2 x FACTOR_BLOCK] panels, and the sweep has [rows, blocksize] blocks (or of its
        # largest member alone, for groups larger than STACK_BYTES)
        swept = group_bytes if group_bytes <= STACK_BYTES else largest * 4
        rows = swept // (4 * in_features)
        return (swept + 2 * (swept // 4) + 2 * min(FACTOR_BLOCK, in_features) * in_features * 4
                + 8 * rows * min(self.blocksize, in_features) * 4)

    def new_stats(self, in_features, device):
        return Hessian(torch.zeros(in_features, in_features, dtype=STATS_DTYPE, device=device))

    def solve_group(self, weights, stats, target, names):
        """Consumes ``stats``: the factor of H^-1 is computed inside the Hessian's buffer, once
        for the group. The members' rows are swept together in one float32 copy while that copy
        is at most ``STACK_BYTES`` (fewer, larger steps), else one member at a time, each result
        stored before the next member's copy is made (the same computation: rows do not
        interact, and the unstructured selection is per linear either way)."""
        h = stats.full()
        dead = _mark_dead(h)
        u, frac = _factor(h, self.percdamp)
        if frac != self.percdamp:
            log.warning("%s: solved with damping %.3g instead of %.3g", ",".join(names), frac,
                        self.percdamp)
        splits = [w.shape[0] for w in weights]
        cols = weights[0].shape[1]
        if sum(splits) * cols * 4 <= STACK_BYTES:
            w = torch.empty(sum(splits), cols, dtype=STATS_DTYPE, device=weights[0].device)
            for part, wi in zip(w.split(splits), weights):
                part.copy_(wi)
            mask = _prune_rows(w, u, dead, target, splits, self.blocksize)
            yield from (Solved(wi, mi) for wi, mi in zip(w.split(splits), mask.split(splits)))
            return
        for wi in weights:
            w = wi.to(STATS_DTYPE, copy=True)
            mask = _prune_rows(w, u, dead, target, [w.shape[0]], self.blocksize)
            yield Solved(w, mask)
            del w, mask
