"""Sparsity specifications and vectorised mask selection.

A mask is a bool tensor shaped like the weight, ``True`` where the weight is *pruned* (set to zero).
Selections never loop over columns in Python: unstructured masks use one ``topk`` per row or per
matrix, N:M masks reshape ``[out, in]`` to ``[out, in/M, M]`` and take a ``topk`` over the last axis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import PatternError, UserError

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Sparsity:
    """What to prune. ``unstructured`` removes a fraction ``ratio`` of weights;
    ``nm`` keeps at most ``n`` of every ``m`` consecutive weights along ``in_features``."""

    kind: Literal["unstructured", "nm"]
    ratio: float  # fraction of weights set to zero (for N:M: 1 - n/m)
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "unstructured":
            if not (0.0 <= self.ratio < 1.0):
                raise UserError(
                    f"sparsity must be in [0, 1), got {self.ratio}; pass e.g. --sparsity 0.5"
                )
        elif self.kind == "nm":
            if self.n is None or self.m is None or not (0 < self.n < self.m):
                raise PatternError(
                    f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}; pass e.g. --pattern 2:4"
                )
        else:  # pragma: no cover - the Literal type guards this
            raise ValueError(self.kind)

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"{self.ratio:g}"

    @classmethod
    def parse(cls, sparsity: float | None, pattern: str | None) -> "Sparsity":
        """Build from the CLI's ``--sparsity`` and ``--pattern`` values.

        ``pattern`` is ``"unstructured"`` (or None) or ``"N:M"``. For N:M the sparsity is implied;
        a contradicting ``--sparsity`` is an error rather than silently ignored.
        """
        if pattern is None or pattern.strip().lower() in ("", "unstructured", "0:0"):
            if sparsity is None:
                raise UserError("missing --sparsity; pass e.g. --sparsity 0.5 or --pattern 2:4")
            return cls("unstructured", float(sparsity))
        match = _NM_RE.match(pattern)
        if not match:
            raise PatternError(
                f"malformed --pattern {pattern!r}; expected N:M with 0 < N < M, e.g. 2:4 or 4:8"
            )
        n, m = int(match.group(1)), int(match.group(2))
        if not (0 < n < m):
            raise PatternError(
                f"malformed --pattern {pattern!r}; expected N:M with 0 < N < M, e.g. 2:4 or 4:8"
            )
        ratio = 1.0 - n / m
        if sparsity is not None and abs(float(sparsity) - ratio) > 1e-9:
            raise UserError(
                f"--sparsity {sparsity} contradicts --pattern {n}:{m} (which prunes {ratio:g}); "
                "drop --sparsity or make them agree"
            )
        return cls("nm", ratio, n, m)


def check_divisible(name: str, in_features: int, target: Sparsity) -> None:
    """Raise a :class:`PatternError` if an N:M pattern cannot tile a layer's input width."""
    if target.kind == "nm" and in_features % target.m != 0:
        raise PatternError(
            f"--pattern {target.n}:{target.m} does not divide the input width {in_features} of "
            f"layer {name}; choose an M that divides {in_features}"
        )


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
    """Prune the lowest-scoring ``ratio`` of weights, per output row or over the whole matrix."""
    if per_row:
        return lowest_k_mask(scores, n_pruned(scores.shape[1], ratio), dim=1)
    flat = lowest_k_mask(scores.reshape(-1), n_pruned(scores.numel(), ratio), dim=0)
    return flat.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Within every group of ``m`` consecutive inputs of each row, prune the ``m - n`` lowest."""
    out_f, in_f = scores.shape  # [out, in]
    assert in_f % m == 0, (in_f, m)
    groups = scores.reshape(out_f, in_f // m, m)  # [out, in/m, m]
    return lowest_k_mask(groups, m - n, dim=2).reshape(out_f, in_f)


def select_mask(scores: torch.Tensor, target: Sparsity, per_row: bool) -> torch.Tensor:
    """Dispatch on the sparsity kind. ``per_row`` only matters for unstructured targets."""
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
