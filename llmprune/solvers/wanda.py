"""Wanda (Sun, Liu, Bair, Kolter, 2024, "A Simple and Effective Pruning Approach for Large
Language Models"), Eq. (1): the importance of weight W_ij is

    S_ij = |W_ij| * ||X_j||_2

where X_j is input feature j over all calibration tokens. Weights are compared *within each
output row* (Sec. 3, "comparison group"), and within each group of M inputs for N:M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.masks import select_mask
from ..core.sparsity import Sparsity
from .base import STATS_DTYPE, Solved, SolverBase, register


@dataclass
class ColumnSquares:
    """Running sum over tokens of x_j^2, float32, shape [in]."""

    sq: torch.Tensor
    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(STATS_DTYPE)
        # square-then-sum, not vector_norm(dim=0): on CPU vector_norm reduces across the
        # strided axis slowly (12.5 ms vs 0.9 ms for 2048 x 1536, as long as the layer's matmul)
        self.sq += x.square().sum(0)
        self.tokens += x.shape[0]


def wanda_scores(weight: torch.Tensor, col_sq: torch.Tensor) -> torch.Tensor:
    """Eq. (1): |W| * ||X_j||_2, with ``col_sq`` = sum over tokens of x_j^2. [out, in]."""
    return weight.abs() * col_sq.sqrt().unsqueeze(0)


def wanda_prune(weight: torch.Tensor, col_sq: torch.Tensor, target: Sparsity) -> Solved:
    keep = select_mask(wanda_scores(weight, col_sq), target, per_row=True)
    return Solved(weight.masked_fill(~keep, 0.0), keep)


CHUNK_BYTES = 8 << 20  # float32 bytes of weight rows scored at a time


def wanda_prune_rows(weight: torch.Tensor, col_sq: torch.Tensor, target: Sparsity,
                     chunk_bytes: int = CHUNK_BYTES) -> Solved:
    """:func:`wanda_prune` a block of rows at a time, *in place*: ``weight`` (any float dtype) is
    pruned and returned, with the keep mask packed (``compact.pack_bits``). Rows are compared on
    their own (and groups of M inside a row), so this is the same mask; but the float32 copy,
    the scores and the selection's workspace exist for ``chunk_bytes`` of rows, not for the
    whole matrix, and no pruned copy or bool mask of the whole matrix is made. Wanda only zeroes
    weights, so pruning in the weight's own dtype is exact."""
    from ..core.bits import pack_bits

    rows, cols = weight.shape
    step = max(1, chunk_bytes // (4 * max(cols, 1)))
    bits = []
    for r0 in range(0, rows, step):
        part = weight[r0:r0 + step]
        keep = select_mask(wanda_scores(part.to(STATS_DTYPE), col_sq), target, per_row=True)
        part.masked_fill_(~keep, 0.0)
        bits.append(pack_bits(keep.cpu()))
    keep = torch.cat(bits) if bits else torch.zeros(0, (cols + 7) // 8, dtype=torch.uint8)
    return Solved(weight, None, keep_bits=keep)


@register
@dataclass
class Wanda(SolverBase):
    name = "wanda"
    help = "Wanda (Sun et al. 2024): drops the smallest |W| * ||x||_2 within each output row."
    needs_calibration = True
    # Wanda's scores come straight from activation norms: bf16 forward passes cost 0.9%
    # perplexity on smollm2-135m (38.01 vs 37.66), so `auto` keeps the model's dtype.
    auto_calib_dtype = None

    def work_bytes(self, in_features: int, group_bytes: int, largest: int) -> int:
        # pruned in place, a chunk of rows at a time: the chunk in float32 with its scores and
        # the selection's workspace (6 chunks), and the packed keep bits
        return 6 * min(CHUNK_BYTES, largest * 4) + largest // 8

    def new_stats(self, in_features, device):
        return ColumnSquares(torch.zeros(in_features, dtype=STATS_DTYPE, device=device))

    def solve_group(self, weights, stats, target, names):
        for w in weights:  # pruned in place, one linear at a time
            yield wanda_prune_rows(w, stats.sq, target)
