"""Non-uniform layer-wise sparsity: OWL.

Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning
LLMs to High Sparsity", Sec. 3:

* the *layerwise outlier distribution* LOD_l of decoder layer l is the fraction of its weights
  whose Wanda score A_ij = ||X_j||_2 * |W_ij| exceeds M times the mean score of that layer
  (all prunable linears of the layer together);
* layers with more outliers are pruned less: the layer sparsity is S_l = 1 - D_l with the
  density D_l growing linearly with LOD_l, and every S_l kept within [S - lambda, S + lambda]
  around the target S.

We map LOD linearly onto densities spanning exactly 2 * lambda (min-max), then shift them so that
the *parameter-weighted* mean sparsity equals S exactly (for equal-sized layers this is the plain
mean). The activation norms come from one dense pass through the layers (no pruning), on the same
calibration batches as the pruning run.
"""

from __future__ import annotations

import torch

from ..core.errors import UserError
from ..core.sparsity import Sparsity
from ..models import Adapter
from ..solvers.wanda import ColumnSquares
from .calibrate import (EngineOptions, capture_inputs, collect_layer_stats, layer_groups,
                        run_layer)


@torch.no_grad()
def outlier_ratios(model, adapter: Adapter, ids: torch.Tensor, m: float,
                   opts: EngineOptions) -> tuple[list[float], list[int]]:
    """LOD_l for every decoder layer, and each layer's number of prunable weights."""
    inputs = capture_inputs(model, adapter, ids, opts)
    device = torch.device(opts.device)
    layers = adapter.layers(model)

    class _Norms:  # the statistics interface collect_layer_stats expects
        @staticmethod
        def new_stats(in_features, dev):
            return ColumnSquares(torch.zeros(in_features, dtype=torch.float32, device=dev))

    ratios, sizes = [], []
    for i, layer in enumerate(layers):
        layer.to(device)
        groups = layer_groups(adapter, layer, inputs)
        stats = collect_layer_stats(layer, list(groups), inputs, _Norms, device)

        def scores():  # Wanda's A = |W| * ||X||, one linear at a time (never the whole layer)
            for group, st in zip(groups, stats):
                norm = st.sq.sqrt().unsqueeze(0)
                for name in group:
                    yield layer.get_submodule(name).weight.detach().float().abs() * norm

        total = numel = 0
        for a in scores():
            total += float(a.sum(dtype=torch.float64))
            numel += a.numel()
        threshold = m * total / numel
        outliers = sum(int((a > threshold).sum()) for a in scores())
        ratios.append(outliers / numel)
        sizes.append(numel)
        if i + 1 < len(layers):
            run_layer(layer, inputs)
        if device.type != "cpu":
            layer.to("cpu")
    return ratios, sizes


def owl_sparsities(lod: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-layer sparsities: density linear in LOD over a span of 2 * lam, weighted mean = target."""
    if not (0.0 <= lam < 1.0):
        raise UserError(f"--owl-lambda must be in [0, 1), got {lam}")
    lod_t = torch.tensor(lod, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    span = lod_t.max() - lod_t.min()
    density = (lod_t - lod_t.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(lod_t)
    density = density - (density * n).sum() / n.sum() + (1.0 - target)
    sparsity = 1.0 - density
    if sparsity.min() < 0 or sparsity.max() >= 1:
        raise UserError(f"OWL with lambda {lam} around sparsity {target} leaves [0, 1) "
                        f"(layers from {sparsity.min():.3f} to {sparsity.max():.3f}); lower "
                        "--owl-lambda")
    return sparsity.tolist()


def owl_targets(model, adapter: Adapter, ids: torch.Tensor, target: Sparsity, lam: float,
                m: float, opts: EngineOptions) -> tuple[list[Sparsity], dict]:
    if target.kind != "unstructured":
        raise UserError("--allocation owl sets a different unstructured sparsity per layer; it "
                        "does not combine with an N:M --pattern")
    lod, sizes = outlier_ratios(model, adapter, ids, m, opts)
    per_layer = owl_sparsities(lod, sizes, target.ratio, lam)
    info = {"method": "owl", "lambda": lam, "m": m, "outlier_ratios": lod,
            "layer_sparsity": per_layer}
    return [Sparsity("unstructured", s) for s in per_layer], info
