"""Choosing what structured pruning removes: importance scores for every attention head and MLP
channel (weight magnitudes or activation norms), and :func:`select`, which turns scores and a
target into a structured mask (``True`` = keep; see :mod:`llmprune.structured.shrink`).

Targets: ``sparsity`` is the fraction of *decoder-layer linear parameters* (weights + biases of
every nn.Linear inside the decoder layers; embeddings, norms and lm_head not counted) removed;
``heads`` / ``mlp`` are fractions of the query heads / MLP channels removed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.errors import UnsupportedArchitectureError, UserError
from .shrink import (LayerGroups, StructuredMask, check_mask, forward_with_hooks, kv_alive,
                     layer_groups, layout_of, removed_params, row_index)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- select
def _check_fraction(name: str, value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0) or math.isnan(value):
        raise UserError(f"--{name} must be a fraction in [0, 1), got {value!r}")


@dataclass
class _Unit:
    """One removable step of attention in a layer: a KV group (gqa='kv' / MHA) or one query head
    per KV group (a round of gqa='even'). ``rank`` orders the steps within a layer."""

    score: float
    layer: int
    rank: int
    heads: list[int]
    params: int


def _attention_units(scores: list[dict[str, torch.Tensor]], groups: list[LayerGroups],
                     gqa: str) -> list[list[_Unit]]:
    """Per layer, its removable attention steps in the order they must be taken (cheapest
    first); every layer keeps at least one query head per surviving KV group and one KV group."""
    out = []
    for i, (g, s) in enumerate(zip(groups, scores)):
        sc = s["heads"].detach().float().cpu().reshape(g.n_kv_heads, g.group_size)
        units = []
        if g.fixed_heads:
            pass  # no head of this layer can go
        elif gqa == "kv" or g.group_size == 1:
            # whole KV groups, scored by the sum of their query heads' scores
            total = sc.sum(dim=1)
            order = torch.argsort(total, stable=True).tolist()
            for rank, j in enumerate(order[:-1]):  # the best group always stays
                heads = list(range(j * g.group_size, (j + 1) * g.group_size))
                units.append(_Unit(float(total[j]), i, rank, heads,
                                   g.group_size * g.head_params + g.kv_params))
        else:
            # round r removes the r-th least important query head of every KV group; rounds are
            # nested and their summed scores non-decreasing, so a global ranking takes them in
            # order. The most important head of each group always stays.
            order = torch.argsort(sc, dim=1, stable=True)  # [n_kv, group]
            for r in range(g.group_size - 1):
                cols = order[:, r]
                heads = [j * g.group_size + int(cols[j]) for j in range(g.n_kv_heads)]
                score = float(sc[torch.arange(g.n_kv_heads), cols].sum())
                units.append(_Unit(score, i, r, heads, g.n_kv_heads * g.head_params))
        out.append(units)
    return out


def _channel_order(scores, groups) -> list[torch.Tensor]:
    """Per layer, channel indices from least to most important (the last one always stays)."""
    return [torch.argsort(s["mlp"].detach().float().cpu(), stable=True) for s in scores]


def _take_attention(units: list[list[_Unit]], uniform: bool, *, count: int | None = None,
                    param_target: float | None = None) -> list[int]:
    """How many steps to take in every layer: ``count`` query heads in all (the nearest
    reachable), or ``param_target`` attention parameters (the nearest reachable)."""
    n_layers = len(units)
    if uniform:
        steps = min(len(u) for u in units)
        best, best_err = 0, math.inf
        for r in range(steps + 1):
            if count is not None:
                err = abs(sum(len(u[k].heads) for u in units for k in range(r)) - count)
            else:
                err = abs(sum(u[k].params for u in units for k in range(r)) - param_target)
            if err < best_err - 1e-9:
                best, best_err = r, err
        return [best] * n_layers
    # non-uniform: one global ranking of the steps (their within-layer order is kept because a
    # layer's step scores never decrease; ties broken by layer then rank)
    ranked = sorted((u for us in units for u in us), key=lambda u: (u.score, u.layer, u.rank))
    taken = [0] * n_layers
    done = 0.0
    goal = count if count is not None else param_target
    for u in ranked:
        size = len(u.heads) if count is not None else u.params
        if abs(done + size - goal) >= abs(done - goal):
            break
        if u.rank != taken[u.layer]:  # only possible with ties broken oddly; keep nesting
            continue
        taken[u.layer] += 1
        done += size
    return taken


def _take_channels(groups: list[LayerGroups], uniform: bool, count: float) -> list[int]:
    """Channels to remove per layer: ``count`` in all, nearest reachable, >= 1 kept per layer."""
    if uniform:
        n_layers = len(groups)
        cap = min(g.n_channels for g in groups) - 1
        return [max(0, min(cap, round(count / n_layers)))] * n_layers
    return [-1] * len(groups)  # filled by the global ranking in select()


def select(scores: list[dict[str, torch.Tensor]], groups: list[LayerGroups], *,
           sparsity: float | None = None, heads: float | None = None, mlp: float | None = None,
           uniform: bool = True, gqa: str = "even") -> StructuredMask:
    """Keep the most important groups so that the target holds.

    ``scores`` has the layout of a mask, higher = more important. Targets:

    * ``heads``: fraction of query heads removed; ``mlp``: fraction of MLP channels removed;
    * ``sparsity``: fraction of decoder-layer linear parameters removed. Given alone, attention
      loses the reachable amount nearest to ``sparsity`` of its own parameters (heads come in
      coarse steps), and the MLP then loses the channels that bring the total nearest to
      ``sparsity`` -- about the same fraction of each kind, the MLP absorbing the rounding. Given
      with ``heads`` (or ``mlp``), that kind is fixed and the other one makes up the total.

    ``uniform=True`` removes the same number of heads / channels in every layer (a plain HF
    config); ``uniform=False`` ranks each kind globally across layers. ``gqa="even"`` removes query
    heads evenly within KV groups (the same count from each); ``gqa="kv"`` removes whole KV groups,
    scored by the sum of their query heads. Every layer keeps at least one KV group, one query head
    per kept KV group and one MLP channel.
    """
    check_targets(sparsity=sparsity, heads=heads, mlp=mlp, gqa=gqa)
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} layers of scores for {len(groups)} layers of groups")
    check_mask(groups, scores)

    units = _attention_units(scores, groups, gqa)
    total = sum(g.total_params for g in groups)
    attn_total = sum(g.n_heads * g.head_params + g.n_kv_heads * g.kv_params for g in groups)
    mlp_total = sum(g.n_channels for g in groups)
    ch_params = groups[0].channel_params

    # attention steps per layer
    if heads is not None:
        steps = _take_attention(units, uniform, count=heads * sum(g.n_heads for g in groups))
    elif sparsity is not None and mlp is None:
        steps = _take_attention(units, uniform, param_target=sparsity * attn_total)
    elif sparsity is not None:  # mlp fixed: attention makes up the total
        steps = _take_attention(units, uniform, param_target=max(
            0.0, sparsity * total - round(mlp * mlp_total) * ch_params))
    else:
        steps = [0] * len(groups)
    attn_removed = sum(u[k].params for u, r in zip(units, steps) for k in range(r))

    # channels in all
    if mlp is not None:
        n_channels = mlp * mlp_total
    elif sparsity is not None:
        n_channels = max(0.0, (sparsity * total - attn_removed) / ch_params)
    else:
        n_channels = 0.0

    order = _channel_order(scores, groups)
    per_layer = _take_channels(groups, uniform, n_channels)
    if not uniform:
        # global ranking of channels; the most important channel of each layer stays
        cand = [(float(scores[i]["mlp"][c]), i, k, int(c)) for i, o in enumerate(order)
                for k, c in enumerate(o[:-1].tolist())]
        cand.sort()
        per_layer = [0] * len(groups)
        for _, i, _, _ in cand[:max(0, min(len(cand), round(n_channels)))]:
            per_layer[i] += 1

    mask: StructuredMask = []
    for i, g in enumerate(groups):
        keep_h = torch.ones(g.n_heads, dtype=torch.bool)
        for u in units[i][:steps[i]]:
            keep_h[u.heads] = False
        keep_c = torch.ones(g.n_channels, dtype=torch.bool)
        keep_c[order[i][:per_layer[i]]] = False
        mask.append({"heads": keep_h, "mlp": keep_c})
    return mask


def describe(groups: list[LayerGroups], mask: StructuredMask) -> dict:
    """A JSON-able summary of a mask: per-layer kept heads (indices) and widths."""
    layers = []
    for g, m in zip(groups, mask):
        heads = m["heads"].bool().cpu()
        layers.append({"kept_heads": torch.nonzero(heads).squeeze(1).tolist(),
                       "n_heads": int(heads.sum()),
                       "n_kv_heads": int(kv_alive(g, heads).sum()),
                       "intermediate_size": int(m["mlp"].bool().sum()),
                       "of": {"n_heads": g.n_heads, "n_kv_heads": g.n_kv_heads,
                              "intermediate_size": g.n_channels}})
    widths = {(x["n_heads"], x["n_kv_heads"], x["intermediate_size"]) for x in layers}
    return {"removed_fraction": removed_params(groups, mask) / sum(g.total_params for g in groups),
            "uniform": len(widths) == 1, "layers": layers}


# ----------------------------------------------------------------------------- one-shot baseline
IMPORTANCES = ("magnitude", "activation")


@torch.no_grad()
def magnitude_scores(model) -> list[dict[str, torch.Tensor]]:
    """L2 norm of each group's weights (the baseline importance, no data).

    A query head: its q rows (+ bias) and output-projection columns, plus its share
    (1 / group_size) of its KV head's k and v rows -- with multi-head attention (OPT) that is the
    head's own k/v. An MLP channel: its rows of the MLP input linears (+ biases) and its column of
    the MLP output linear."""
    adapter, lay = layout_of(model)
    scores = []
    for layer, g in zip(adapter.layers(model), layer_groups(model)):
        index = row_index(lay, g)

        def rows_sq(kind: str, block: int) -> torch.Tensor:  # [rows of kind / block]
            parts = []
            for name, rows in index[kind]:
                lin = layer.get_submodule(name)
                rows = rows.to(lin.weight.device)
                sq = lin.weight.detach()[rows].float().pow(2).sum(dim=1)
                if lin.bias is not None:
                    sq = sq + lin.bias.detach()[rows].float().pow(2)
                parts.append(sq.reshape(-1, block).sum(dim=1))
            return sum(parts)

        ch = rows_sq("mlp", 1)
        ch = ch + layer.get_submodule(lay.mlp_out).weight.detach().float().pow(2).sum(dim=0)
        if g.fixed_heads:  # heads stay: their scores only fill the mask's layout
            scores.append({"heads": torch.ones(g.n_heads), "mlp": ch.sqrt().cpu()})
            continue
        q_sq = rows_sq("q", g.head_dim)  # [n_heads]
        o_sq = (layer.get_submodule(lay.o).weight.detach().float().pow(2).sum(dim=0)
                .reshape(g.n_heads, g.head_dim).sum(dim=1))
        kv_sq = rows_sq("k", g.head_dim) + rows_sq("v", g.head_dim)  # [n_kv]
        heads = q_sq + o_sq + kv_sq.repeat_interleave(g.group_size) / g.group_size
        scores.append({"heads": heads.sqrt().cpu(), "mlp": ch.sqrt().cpu()})
    return scores


@torch.no_grad()
def activation_scores(model, calib_ids: torch.Tensor, batch_size: int = 4,
                      progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """L2 norm of each group's activations over the calibration tokens: a head's slice of the
    output projection's input (its attention output), a channel's input to the MLP output
    linear. Gathered with forward pre-hooks during plain forward passes (no autograd)."""
    adapter, lay = layout_of(model)
    groups = layer_groups(model)
    sums: list[dict[str, torch.Tensor]] = [
        {"heads": torch.zeros(g.n_heads * g.head_dim, dtype=torch.float64),
         "mlp": torch.zeros(g.n_channels, dtype=torch.float64)} for g in groups]

    def accumulate(acc: torch.Tensor):
        def hook(module, args):
            x = args[0].detach().float()
            acc.add_(x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0).double().cpu())
        return hook

    hooks = [(layer.get_submodule(name), accumulate(s[kind]))
             for layer, s in zip(adapter.layers(model), sums)
             for name, kind in ((lay.o, "heads"), (lay.mlp_out, "mlp"))]
    forward_with_hooks(model, calib_ids, batch_size, hooks, "activation norms", progress)
    return [{"heads": s["heads"].reshape(g.n_heads, g.head_dim).sum(dim=1).sqrt().float(),
             "mlp": s["mlp"].sqrt().float()} for s, g in zip(sums, groups)]


def check_targets(*, sparsity=None, heads=None, mlp=None, gqa="even") -> None:
    """Validate a structured target before anything expensive runs (raises UserError)."""
    if gqa not in ("even", "kv"):
        raise UserError(f"--gqa must be even or kv, got {gqa!r}")
    for name, value in (("sparsity", sparsity), ("heads", heads), ("mlp", mlp)):
        _check_fraction(name, value)
    if sparsity is None and heads is None and mlp is None:
        raise UserError("give a target: --sparsity, or --heads and/or --mlp")
    if sparsity is not None and heads is not None and mlp is not None:
        raise UserError("--sparsity with both --heads and --mlp over-determines the target; "
                        "drop one of them")


def check_supported(model) -> None:
    """Raise a one-line UserError when the model's family has no structured layout."""
    layout_of(model)


def check_family(model, *, heads: float | None = None, sparsity: float | None = None,
                 uniform: bool = True) -> None:
    """Raise a one-line UserError when the target needs what the family cannot do: remove
    heads (``heads`` > 0) where its heads are fixed (a ``sparsity`` target then comes from the
    MLP alone), or keep different head counts per layer (``uniform=False`` with a ``heads`` or
    ``sparsity`` target) where its attention reads one head count from the shared config."""
    _, lay = layout_of(model)
    name = f"model type {model.config.model_type!r}"
    if heads and lay.fixed_heads:
        raise UnsupportedArchitectureError(
            f"{name}: no attention head can be removed: {lay.fixed_heads}; prune MLP channels "
            "only (--mlp)")
    if (heads or (sparsity and heads is None)) and not uniform and lay.uniform_heads and not (
            lay.fixed_heads):
        raise UnsupportedArchitectureError(
            f"{name}: {lay.uniform_heads}, so every layer must keep the same head count: use "
            "uniform selection, or prune MLP channels only (--mlp)")


def prune_structured(model, *, importance: str = IMPORTANCES[0], sparsity: float | None = None,
                     heads: float | None = None, mlp: float | None = None, uniform: bool = True,
                     gqa: str = "even", calib_ids: torch.Tensor | None = None,
                     batch_size: int = 4, progress: bool = True) -> tuple[StructuredMask, dict]:
    """The one-shot baseline: score every head and channel (``magnitude`` or ``activation``), then
    :func:`select`. Returns the mask (the model is not modified) and a summary."""
    if importance not in IMPORTANCES:
        raise UserError(f"--importance must be magnitude or activation, got {importance!r}")
    check_targets(sparsity=sparsity, heads=heads, mlp=mlp, gqa=gqa)
    check_family(model, heads=heads, sparsity=sparsity, uniform=uniform)
    if importance == "activation":
        if calib_ids is None:
            raise UserError("activation importance needs calibration data")
        scores = activation_scores(model, calib_ids, batch_size, progress)
    else:
        scores = magnitude_scores(model)
    groups = layer_groups(model)
    mask = select(scores, groups, sparsity=sparsity, heads=heads, mlp=mlp, uniform=uniform,
                  gqa=gqa)
    return mask, describe(groups, mask)
