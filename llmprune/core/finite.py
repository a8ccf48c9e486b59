"""Refusing weights that are NaN or infinite: one check per tensor, as it is loaded."""

from __future__ import annotations

import torch

from .errors import NonFiniteError


def check_finite(name: str, tensor: torch.Tensor, where) -> None:
    """NonFiniteError naming tensor ``name`` of ``where`` (a file or directory) when a floating
    point ``tensor`` holds a NaN or an infinity; integer tensors always pass."""
    if not tensor.is_floating_point():
        return
    # a NaN or an infinity makes the sum non-finite, so a finite sum clears the tensor (20x
    # faster than isfinite: no bool tensor); a non-finite sum can also be an overflow of large
    # finite values, hence the exact check
    if bool(tensor.sum().isfinite()) or bool(torch.isfinite(tensor).all()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise NonFiniteError(f"{where}: tensor {name} has {bad} NaN/Inf values; pruning or "
                         "evaluating it gives meaningless results: use an undamaged checkpoint "
                         "(re-download or re-export it)")


def check_finite_model(model: torch.nn.Module, where) -> None:
    """:func:`check_finite` for every parameter and buffer of ``model`` (tied ones once)."""
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta" or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        check_finite(name, tensor.detach(), where)
