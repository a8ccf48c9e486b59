"""Vectorised mask selection.

A mask is a bool tensor shaped like the weight, ``True`` where the weight is *kept* (everywhere
in llmprune: solvers' results, the masks file, compact encodings, structured masks); the pruned
weights are ``~mask``. :func:`lowest_k_mask` is the selection underneath: True at the k
smallest scores, the ones a mask drops. Selections never loop over columns in Python:
unstructured masks use one ``topk`` per row or per matrix, N:M masks reshape ``[out, in]`` to
``[out, in/M, M]`` and take a ``topk`` over the last axis.
"""

from __future__ import annotations

import torch

from .sparsity import Sparsity


def n_pruned(count: int, ratio: float) -> int:
    """Number of weights to prune among ``count`` at ``ratio``: round half to even, like Python."""
    return int(round(count * ratio))


def lowest_k_mask(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Mask ``True`` at the ``k`` smallest scores along ``dim``: exactly k per slice.

    Uses the k-th value as a threshold (about 3x faster than ``topk`` for k near half the
    slice); ties at the threshold are broken by position so the count stays exact.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[dim]:
        return torch.ones_like(scores, dtype=torch.bool)
    thr = torch.kthvalue(scores, k, dim=dim, keepdim=True).values
    mask = scores <= thr
    if bool((mask.sum(dim=dim) == k).all()):  # no ties at the threshold: the usual case
        return mask
    mask = scores < thr
    deficit = k - mask.sum(dim=dim, keepdim=True)  # ties at the threshold still to take
    tie = scores == thr
    return mask | (tie & (tie.cumsum(dim=dim) <= deficit))


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
