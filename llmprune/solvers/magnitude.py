"""Magnitude pruning, the baseline (Han et al., 2015; the baseline of the SparseGPT and Wanda
papers): score = |W|, compared over the whole matrix for unstructured targets (layer-wise
magnitude, as in the Wanda paper's baseline) and within each group of M inputs for N:M.
It needs no calibration data and runs no calibration pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.masks import select_mask
from ..core.sparsity import Sparsity
from .base import Solved, SolverBase, register


def magnitude_prune(weight: torch.Tensor, target: Sparsity) -> Solved:
    """Pure function: ``weight`` [out, in] float32 -> pruned copy and keep mask."""
    keep = select_mask(weight.abs(), target, per_row=False)
    return Solved(weight.masked_fill(~keep, 0.0), keep)


@register
@dataclass
class Magnitude(SolverBase):
    name = "magnitude"
    help = ("Magnitude pruning, the baseline: drops the smallest |W| per layer. Reads no "
            "calibration data.")
    needs_calibration = False

    def work_bytes(self, in_features: int, group_bytes: int, largest: int) -> int:
        # one member at a time, whole: float32 copy, |W|, the selection's copy of it, the
        # pruned copy (float32), the keep mask (bool) and its complement
        return 4 * largest * 4 + 2 * largest

    def new_stats(self, in_features, device):
        return None

    def solve_group(self, weights, stats, target, names):
        for w in weights:
            yield magnitude_prune(w.to(torch.float32), target)
