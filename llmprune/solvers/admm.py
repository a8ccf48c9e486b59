"""ADMM pruning with gradual mask growth (Boža 2024, "Fast and Effective Weight Update for
Pruned Large Language Models"), then exact reconstruction on the final mask by conjugate
gradient (the last phase of ALPS: Meng et al. 2024, "ALPS: Improved Optimization for Highly
Sparse One-Shot Pruning for Large Language Models", Sec. 3.3).

For a linear with weight W0 [out, in] and Hessian H = X^T X [in, in] the layer-wise problem is

    min_W  tr((W - W0) H (W - W0)^T)   s.t.  W has the target's sparsity pattern.

Everything is solved in the *normalised* space: with d = sqrt(diag H) (1 where an input never
fires), Hn = D^-1 H D^-1 + percdamp I and Wn = W D, so diag Hn is 1 + percdamp and |Wn| is Wanda's
importance |W_ij| * ||X_j|| (Boža, Sec. 3.1, "preconditioning"). The ADMM splitting W = Z, Z sparse,
with scaled dual U, iterates (Boža Eq. 4-6, Boyd et al. 2011 Sec. 3.1.1):

    W <- (Wn0 Hn + rho (Z - U)) (Hn + rho I)^-1         (Eq. 4: the quadratic step)
    Z <- proj(W + U)                                    (Eq. 5: keep the largest |W + U|)
    U <- U + W - Z                                      (Eq. 6)

with rho multiplied by ``rho_growth`` every iteration. One eigendecomposition Hn = Q diag(l) Q^T
serves every rho: (Hn + rho I)^-1 = Q diag(1 / (l + rho)) Q^T, so an iteration is two [out, in] x
[in, in] products for all rows of a group at once. The mask grows gradually (Boža Sec. 3.2):
during the first ``grow_iters`` iterations only the smallest fraction ((k+1) / grow_iters)^3 of
the final pattern's pruned weights (chosen from |W + U|) is removed; the later iterations use
the full pattern, chosen again from |W + U| each time.

The final mask fixes the support; the weights on it minimise the layer loss exactly, row by row:
Hn[S, S] w_S = (Wn0 Hn)[r, S] (ALPS Eq. 9, the "post-processing" least squares), solved for all
rows together by ``cg_iters`` steps of conjugate gradient started from the ADMM iterate (the
preconditioner of ALPS Sec. 3.3 is diag Hn, constant here after the normalisation, so plain CG).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import UserError
from ..core.flags import positive_int
from ..core.masks import lowest_k_mask, n_pruned
from ..core.sparsity import Sparsity
from .base import STATS_DTYPE, Solved, SolverBase, option, register
from .sparsegpt import Hessian

DEFAULT_ITERS = 20
DEFAULT_GROW_ITERS = 12
DEFAULT_RHO = 0.1
DEFAULT_RHO_GROWTH = 1.3
DEFAULT_CG_ITERS = 20
DEFAULT_PERCDAMP = 0.01


def normalise(h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hn, d): d = sqrt(diag H) [in], 1 where the input never fired; Hn = D^-1 H D^-1 +
    percdamp I [in, in], float32."""
    d = torch.diagonal(h).clamp_min(0).sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    hn = h / d.unsqueeze(0) / d.unsqueeze(1)
    hn.diagonal().add_(percdamp)
    return hn, d


def pruned_set(scores: torch.Tensor, target: Sparsity, row_splits: list[int], per_row: bool,
               fraction: float = 1.0) -> torch.Tensor:
    """bool [out, in], True at the weights to prune: the target's pattern chosen from ``scores``
    (unstructured: the lowest ``ratio`` of each linear's weights, or of each row when
    ``per_row``; N:M: the lowest M - N of every M inputs). With ``fraction`` < 1 only that
    fraction of them, the lowest-scoring ones of each linear (the growing mask of Boža Sec. 3.2)."""
    parts = []
    for s in scores.split(row_splits, dim=0):  # s: [rows, in], one linear
        if target.kind == "nm":
            rows, cols = s.shape
            groups = s.reshape(rows, cols // target.m, target.m)
            full = lowest_k_mask(groups, target.m - target.n, dim=2).reshape(rows, cols)
        elif per_row:
            full = lowest_k_mask(s, n_pruned(s.shape[1], target.ratio), dim=1)
        else:
            # the lowest `fraction` of the linear's lowest `ratio` are its lowest
            # `ratio * fraction` (both ordered by score, then position): one selection
            n = n_pruned(s.numel(), target.ratio)
            k = n if fraction >= 1.0 else n_pruned(n, fraction)
            parts.append(lowest_k_mask(s.reshape(-1), k, dim=0).view_as(s))
            continue
        if fraction < 1.0:
            cand = s.masked_fill(~full, float("inf")).reshape(-1)
            k = n_pruned(int(full.sum()), fraction)
            full = lowest_k_mask(cand, k, dim=0).view_as(s)
        parts.append(full)
    return torch.cat(parts)


def admm(wn0_h: torch.Tensor, q: torch.Tensor, lam: torch.Tensor, wn0: torch.Tensor,
         target: Sparsity, row_splits: list[int], per_row: bool, iters: int, grow_iters: int,
         rho: float, rho_growth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Boža Eq. 4-6 in the normalised space. ``wn0_h`` = Wn0 Hn [out, in], ``q`` [in, in] and
    ``lam`` [in] the eigenvectors and eigenvalues of Hn, ``wn0`` [out, in] the dense weights (the
    first iterate). Returns (Z: the sparse iterate [out, in], pruned: bool [out, in])."""
    w = wn0.clone()
    u = torch.zeros_like(w)
    z = w
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for k in range(iters):
        if k:  # Eq. 4 (the first iterate is the dense W itself, the unconstrained optimum)
            rhs = torch.add(wn0_h, z - u, alpha=rho)  # [out, in]
            w = ((rhs @ q) / (lam + rho).unsqueeze(0)) @ q.T
        v = w + u
        fraction = min(1.0, ((k + 1) / grow_iters) ** 3) if grow_iters > 0 else 1.0
        pruned = pruned_set(v.abs(), target, row_splits, per_row, fraction)
        z = v.masked_fill(pruned, 0.0)  # Eq. 5
        u = v - z  # Eq. 6: U + W - Z
        rho *= rho_growth
    return z, pruned


def masked_cg(w: torch.Tensor, hn: torch.Tensor, b: torch.Tensor, keep: torch.Tensor,
              iters: int) -> torch.Tensor:
    """Conjugate gradient on every row at once for min_w w Hn w^T - 2 b w^T over the support
    ``keep`` [out, in] of that row (ALPS Eq. 9): the normal equations are Hn[S, S] w_S = b_S.
    ``w`` [out, in] is the start (zero off the support), ``b`` = Wn0 Hn. Returns the solution,
    exactly zero off the support."""
    keep_f = keep.to(w.dtype)
    x = w * keep_f
    r = (b - x @ hn) * keep_f  # residual on the support [out, in]
    p = r.clone()
    rr = (r * r).sum(1, keepdim=True)  # [out, 1]
    tiny = torch.finfo(w.dtype).tiny
    for _ in range(iters):
        ap = (p @ hn) * keep_f
        alpha = rr / (p * ap).sum(1, keepdim=True).clamp_min(tiny)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        rr_new = (r * r).sum(1, keepdim=True)
        p = r + (rr_new / rr.clamp_min(tiny)) * p
        rr = rr_new
    return x


def admm_prune(weight: torch.Tensor, h: torch.Tensor, target: Sparsity,
               row_splits: list[int] | None = None, iters: int = DEFAULT_ITERS,
               grow_iters: int = DEFAULT_GROW_ITERS, rho: float = DEFAULT_RHO,
               rho_growth: float = DEFAULT_RHO_GROWTH, cg_iters: int = DEFAULT_CG_ITERS,
               percdamp: float = DEFAULT_PERCDAMP, per_row: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] (rows of one or more linears stacked, ``row_splits`` their row
    counts), ``h`` [in, in] = X^T X. Returns (pruned float32 weight [out, in], keep mask)."""
    w0 = weight.to(STATS_DTYPE)
    hn, d = normalise(h.to(STATS_DTYPE), percdamp)
    lam, q = torch.linalg.eigh(hn)  # Hn = Q diag(lam) Q^T
    wn0 = w0 * d.unsqueeze(0)  # [out, in]
    wn0[:, torch.diagonal(h) <= 0] = 0.0  # inputs that never fire: their weights go first
    b = wn0 @ hn  # [out, in]
    splits = row_splits or [w0.shape[0]]
    z, pruned = admm(b, q, lam, wn0, target, splits, per_row, iters, grow_iters, rho,
                     rho_growth)
    keep = pruned.logical_not_()
    wn = masked_cg(z, hn, b, keep, cg_iters) if cg_iters > 0 else z
    return wn / d.unsqueeze(0), keep


@register
@dataclass
class ADMM(SolverBase):
    name = "admm"
    help = ("ADMM with a gradually grown mask (Boža 2024), then exact reconstruction on the "
            "mask by conjugate gradient (ALPS, Meng et al. 2024).")
    needs_calibration = True
    # the Hessian is accumulated in float32 from forward passes in the model's dtype
    auto_calib_dtype = None
    iters: int = option(DEFAULT_ITERS, "ADMM iterations", parse=positive_int)
    grow_iters: int = option(DEFAULT_GROW_ITERS,
                             "iterations over which the mask grows to the target (0: at once)",
                             parse=int)
    rho: float = option(DEFAULT_RHO, "initial ADMM penalty (the Hessian normalised to unit "
                        "diagonal)")
    rho_growth: float = option(DEFAULT_RHO_GROWTH, "factor applied to rho every iteration")
    cg_iters: int = option(DEFAULT_CG_ITERS, "conjugate-gradient steps of the final "
                           "reconstruction on the mask (0: none)", parse=int)
    percdamp: float = option(DEFAULT_PERCDAMP, "damping added to the normalised Hessian's "
                             "unit diagonal")
    per_row: bool = option(False, "unstructured: prune the same fraction of every output row "
                           "(default: of each linear as a whole)")

    def __post_init__(self) -> None:
        if self.grow_iters < 0 or self.cg_iters < 0:
            raise UserError("--grow-iters and --cg-iters must be >= 0")
        if self.grow_iters > self.iters:
            raise UserError("--grow-iters must be at most --iters")
        if self.rho <= 0 or self.rho_growth < 1:
            raise UserError("--rho must be > 0 and --rho-growth >= 1")
        if not (0 <= self.percdamp < 1):
            raise UserError("--percdamp must be in [0, 1)")

    def stats_bytes(self, in_features: int) -> int:
        return in_features * in_features * 4  # the Hessian, float32

    def work_bytes(self, in_features: int, group_bytes: int, largest: int) -> int:
        # Hn, its eigenvectors and eigh's workspace ([in, in] each), and about eight float32
        # copies of the group's rows (W0 Hn, W, Z, U, the right-hand side, CG's x, r, p)
        return 3 * in_features * in_features * 4 + 8 * group_bytes

    def new_stats(self, in_features, device):
        return Hessian(torch.zeros(in_features, in_features, dtype=STATS_DTYPE, device=device))

    def solve_group(self, weights, stats, target, names):
        """The members' rows are solved together: they share the Hessian and its
        eigendecomposition; each linear's unstructured selection is its own."""
        splits = [w.shape[0] for w in weights]
        stacked = torch.cat([w.to(STATS_DTYPE) for w in weights])
        w, keep = admm_prune(stacked, stats.full(), target, splits, self.iters, self.grow_iters,
                             self.rho, self.rho_growth, self.cg_iters, self.percdamp,
                             self.per_row)
        yield from (Solved(wi, ki) for wi, ki in zip(w.split(splits), keep.split(splits)))
