"""Whole-expert pruning: remove the least useful experts of every mixture-of-experts layer.

Saliency of expert j of a layer, on the calibration tokens X_j the router sends to it:

* ``reap`` (REAP, Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE
  Compression"): the router-weighted expert activation norm
  S_j = 1/|X_j| * sum_{x in X_j} g_j(x) * ||f_j(x)||_2,
  with g_j(x) the router's (normalised) gate value of expert j for token x and f_j(x) the
  expert's output before that gate;
* ``frequency``: |X_j|, how many calibration tokens the router sends to j.

The same number of experts is kept in every layer (the ``keep`` with the highest saliency), so
the result is a plain checkpoint: the fused expert parameters and the router rows are sliced to
the kept experts, and the config's expert count says how many remain.

Experts are run the transformers 5 way, ``experts(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])``: f_j is that call with every token sent to j alone at weight 1. Families
whose experts module runs every expert on every token (Llama 4) are refused.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.errors import UnsupportedArchitectureError, UserError
from ..models import adapter_for
from ..models.discovery import EXPERT_COUNT_KEYS, one_row_per_expert
from ..models.experts import eager_experts, fused_params

SALIENCIES = ("reap", "frequency")


@dataclass
class MoEBlock:
    layer: int
    experts: nn.Module  # holds the fused [experts, ...] parameters
    routers: list[nn.Module]  # modules beside it whose every tensor has one row per expert


def _per_expert_tensors(module: nn.Module, n: int) -> list[str]:
    return [name for name, t in [*module.named_parameters(recurse=False),
                                 *module.named_buffers(recurse=False)]
            if t is not None and t.dim() >= 1 and t.shape[0] == n]


def moe_blocks(model) -> tuple[list[MoEBlock], int]:
    """The experts modules of ``model`` with their routers, and the expert count."""
    adapter = adapter_for(model)
    n = adapter.experts
    if not n:
        raise UnsupportedArchitectureError(
            f"{model.config.model_type} has no mixture-of-experts layers (no expert count in its "
            "config); whole-expert pruning applies to MoE models only")
    blocks = []
    for i, layer in enumerate(adapter.layers(model)):
        for path, module in layer.named_modules():
            if not fused_params(module, n):
                continue
            parent = layer.get_submodule(path.rpartition(".")[0]) if "." in path else layer
            inside = set(map(id, module.modules()))
            routers = [m for m in parent.modules()
                       if id(m) not in inside and one_row_per_expert(m, n)]
            if not routers:
                raise UnsupportedArchitectureError(
                    f"layer {i}: found the experts {path} but no router beside them (a module "
                    f"whose weights have one row per expert); cannot prune whole experts")
            blocks.append(MoEBlock(i, module, routers))
    if not blocks:
        raise UnsupportedArchitectureError(
            f"{model.config.model_type}: no fused expert parameters found ([experts, ...] 3D "
            "weights); whole-expert pruning needs transformers 5's expert layout")
    return blocks, n


def _routed_args(module: nn.Module):
    """The experts' forward parameters (hidden, top-k index, top-k weights), or refuse."""
    params = list(inspect.signature(type(module).forward).parameters)[1:]
    if len(params) < 3:
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} runs every expert on every token (its forward takes no "
            "routing); whole-expert pruning needs experts called with their top-k routing")
    return params[:3]


@torch.no_grad()
def expert_saliency(model, ids: torch.Tensor, batch_size: int = 4, progress: bool = True
                    ) -> dict[str, list[torch.Tensor]]:
    """Per MoE block, float64 ``[experts]`` saliencies under every criterion of
    :data:`SALIENCIES`, from the forward passes of ``ids`` through ``model``."""
    blocks, n = moe_blocks(model)
    sums = [torch.zeros(n, dtype=torch.float64) for _ in blocks]
    counts = [torch.zeros(n, dtype=torch.float64) for _ in blocks]
    hooks = []

    def hook_for(b: int, module: nn.Module, names: list[str]):
        forward = type(module).forward
        signature = inspect.signature(forward)

        def hook(_mod, args, kwargs):
            bound = signature.bind(module, *args, **kwargs).arguments
            hidden, index, weight = (bound[k] for k in names)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            index = index.reshape(hidden.shape[0], -1)
            weight = weight.reshape(hidden.shape[0], -1)
            for j in range(n):
                chosen = index == j  # [T, k]
                rows = chosen.any(-1)
                m = int(rows.sum())
                if m == 0:
                    continue
                gate = (weight * chosen).sum(-1)[rows].double()  # g_j(x)
                alone = torch.full((m, 1), j, dtype=index.dtype, device=index.device)
                out = forward(module, hidden[rows], alone,
                              torch.ones((m, 1), dtype=weight.dtype, device=weight.device))
                sums[b][j] += float((gate * out.double().norm(dim=-1)).sum())
                counts[b][j] += m
        return hook

    try:
        for b, block in enumerate(blocks):
            names = _routed_args(block.experts)
            hooks.append(block.experts.register_forward_pre_hook(
                hook_for(b, block.experts, names), with_kwargs=True))
        device = next(model.parameters()).device
        with eager_experts(model.config):
            for batch in tqdm(ids.split(batch_size), desc="expert saliency", unit="batch",
                              disable=not progress):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {"reap": [s / c.clamp(min=1) for s, c in zip(sums, counts)], "frequency": counts}


def kept_count(experts: int, keep_ratio: float) -> int:
    """How many of ``experts`` experts a layer keeps: ``round(keep_ratio * experts)``, at least
    one."""
    return max(1, min(experts, round(keep_ratio * experts)))


def kept_experts(saliency: list[torch.Tensor], keep_ratio: float) -> tuple[list[torch.Tensor], int]:
    """The experts each block keeps (the :func:`kept_count` most salient, ties to the lower
    index, in their original order), and that count."""
    n = saliency[0].numel()
    keep = kept_count(n, keep_ratio)
    out = []
    for s in saliency:
        order = sorted(range(n), key=lambda j: (-float(s[j]), j))
        out.append(torch.tensor(sorted(order[:keep]), dtype=torch.long))
    return out, keep


def _expert_count_keys(config, n: int) -> list[str]:
    return [k for k in EXPERT_COUNT_KEYS if getattr(config, k, None) == n]


def check_keep(config, n: int, keep: int) -> None:
    """The smaller expert count must still make a valid config of the family."""
    top_k = getattr(config, "num_experts_per_tok", None)
    if isinstance(top_k, int) and keep < top_k:
        raise UserError(f"keeping {keep} of {n} experts is fewer than the {top_k} the router "
                        f"picks per token (num_experts_per_tok); raise --keep-ratio to at least "
                        f"{math.ceil(top_k / n * 100) / 100}")
    groups = getattr(config, "n_group", None)
    if isinstance(groups, int) and groups > 1 and keep % groups:
        raise UserError(f"the router picks experts in {groups} groups (n_group), so the kept "
                        f"count must be a multiple of {groups}; {keep} of {n} is not: choose "
                        "another --keep-ratio")


def remove_experts(model, keep: list[torch.Tensor]) -> dict:
    """Slice every block's expert tensors and router rows to ``keep`` (in place), and set the
    config's expert count. Returns a summary."""
    blocks, n = moe_blocks(model)
    count = len(keep[0])
    check_keep(model.config, n, count)
    for block, idx in zip(blocks, keep):
        for module in [block.experts, *block.routers]:
            for name in _per_expert_tensors(module, n):
                t = getattr(module, name)
                sliced = t.detach().index_select(0, idx.to(t.device)).clone()
                if isinstance(t, nn.Parameter):
                    setattr(module, name, nn.Parameter(sliced, requires_grad=t.requires_grad))
                else:
                    setattr(module, name, sliced)
            for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
                if getattr(module, attr, None) == n:
                    setattr(module, attr, count)
    for key in _expert_count_keys(model.config, n):
        setattr(model.config, key, count)
    return {"experts_before": n, "experts_after": count, "blocks": len(blocks),
            "kept": {str(b.layer): idx.tolist() for b, idx in zip(blocks, keep)}}


__all__ = ["MoEBlock", "SALIENCIES", "check_keep", "expert_saliency", "kept_count",
           "kept_experts", "moe_blocks", "remove_experts"]
