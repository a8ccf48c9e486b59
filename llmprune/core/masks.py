"""Vectorised mask selection.

A mask is a bool tensor shaped like the weight, ``True`` where the weight is *kept* (everywhere
in llmprune: solvers' results, the masks file, compact encodings, structured masks); the pruned
weights are ``~mask``. :func:`lowest_k_mask` is the selection underneath: True at the k
smallest scores, the ones a mask drops. Selections never loop over columns in Python:
unstructured masks take one k-th value per row or per matrix, N:M masks reshape ``[out, in]``
to ``[out, in/M, M]`` and rank the M scores of every group at once.
"""

from __future__ import annotations

import torch

from .sparsity import Sparsity


def n_pruned(count: int, ratio: float) -> int:
    """Number of weights to prune among ``count`` at ``ratio``: round half to even, like Python."""
    return int(round(count * ratio))


def lowest_k_mask(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Mask ``True`` at the ``k`` smallest scores along ``dim``: exactly k per slice, ties
    broken by position (the earlier one is taken first).

    Short slices (N:M groups, at most :data:`SHORT_SLICE` long) are ranked by pairwise
    comparison; long single slices find their k-th value in a bracket a sample of the scores
    narrows down; otherwise the k-th value comes from ``kthvalue``. All three give the same mask.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[dim]:
        return torch.ones_like(scores, dtype=torch.bool)
    short = scores.shape[dim] <= SHORT_SLICE
    fast = short or (scores.dim() == 1 and scores.numel() >= BRACKET_MIN)
    # the fast paths assume NaN-free scores; kthvalue ranks NaN last
    if fast and not (scores.is_floating_point() and bool(torch.isnan(scores).any())):
        if short:
            return rank_below(scores, k, dim)
        thr = kth_smallest(scores, k).reshape(1)
    else:
        thr = torch.kthvalue(scores, k, dim=dim, keepdim=True).values
    mask = scores <= thr
    if bool((mask.sum(dim=dim) == k).all()):  # no ties at the threshold: the usual case
        return mask
    mask = scores < thr
    deficit = k - mask.sum(dim=dim, keepdim=True)  # ties at the threshold still to take
    tie = scores == thr
    return mask | (tie & (tie.cumsum(dim=dim) <= deficit))


SHORT_SLICE = 8  # slices up to this long are ranked by comparing every pair (m^2 compares)
BRACKET_MIN = 1 << 16  # single slices from this size use kth_smallest's bracket


def rank_below(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """True where the rank of a score in its slice along ``dim`` is below ``k``; rank_i =
    #{j > i: s_j < s_i} + #{j < i: s_j <= s_i}, so ties go to the earlier position (NaN-free
    scores). One contiguous [...] plane per position and m^2 elementwise compares: for N:M
    groups several times faster than kthvalue's per-slice selection."""
    planes = scores.movedim(dim, 0).contiguous()  # [m, ...]
    m = planes.shape[0]
    out = torch.empty(planes.shape, dtype=torch.bool, device=planes.device)
    for i in range(m):
        rank = torch.zeros(planes.shape[1:], dtype=torch.uint8, device=planes.device)
        for j in range(m):
            if j != i:
                rank += (planes[j] <= planes[i]) if j < i else (planes[j] < planes[i])
        out[i] = rank < k
    return out.movedim(0, dim).contiguous()


def kth_smallest(flat: torch.Tensor, k: int, sample: int = 1 << 14) -> torch.Tensor:
    """The k-th smallest value (1-based) of a NaN-free 1-D tensor, exactly: an evenly strided
    sample of the values, sorted, brackets the k-th value between two sample quantiles a few
    standard deviations apart; the values inside the bracket are few, and ``kthvalue`` of them
    is the answer. Falls back to ``kthvalue`` of everything when the bracket misses."""
    n = flat.numel()
    stride = max(1, n // sample)
    picked = flat[::stride].sort().values  # [s]
    s = picked.numel()
    centre = k / n * s
    spread = 4.0 * (s * (k / n) * (1 - k / n)) ** 0.5 + 2  # binomial s.d. of the rank, 4x
    lo = picked[max(0, int(centre - spread))]
    hi = picked[min(s - 1, int(centre + spread) + 1)]
    below = int((flat < lo).sum())
    inside = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + inside.numel():
        return torch.kthvalue(inside, k - below).values
    return torch.kthvalue(flat, k).values


def unstructured_mask(scores: torch.Tensor, ratio: float, per_row: bool) -> torch.Tensor:
    """Keep mask that drops the lowest-scoring ``ratio`` of weights, per output row or over the
    whole matrix."""
    if per_row:
        return lowest_k_mask(scores, n_pruned(scores.shape[1], ratio), dim=1).logical_not_()
    flat = lowest_k_mask(scores.reshape(-1), n_pruned(scores.numel(), ratio), dim=0)
    return flat.logical_not_().view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask: within every group of ``m`` consecutive inputs of each row, the ``n`` highest
    scores kept (the ``m - n`` lowest dropped)."""
    out_f, in_f = scores.shape  # [out, in]
    assert in_f % m == 0, (in_f, m)
    groups = scores.reshape(out_f, in_f // m, m)  # [out, in/m, m]
    return lowest_k_mask(groups, m - n, dim=2).logical_not_().reshape(out_f, in_f)


def select_mask(scores: torch.Tensor, target: Sparsity, per_row: bool) -> torch.Tensor:
    """Keep mask for ``target``. ``per_row`` only matters for unstructured targets."""
    if target.kind == "nm":
        return nm_mask(scores, target.n, target.m)
    return unstructured_mask(scores, target.ratio, per_row)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups in ``weight`` holding more than N nonzeros (0 means the tensor is N:M)."""
    out_f, in_f = weight.shape
    if in_f % m:
        return out_f * ((in_f + m - 1) // m)
    nnz = (weight.reshape(out_f, in_f // m, m) != 0).sum(dim=2)
    return int((nnz > n).sum())
