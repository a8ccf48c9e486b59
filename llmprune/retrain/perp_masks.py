"""PERP's bookkeeping of the pruning masks: which weight each mask keeps, and the check that
training left every pruned weight at zero.

A mask is keyed by module name (or ``<module>.weight``) as the pruning run writes it: a linear of
the model, or one expert of a fused expert parameter, ``<experts>.expert_linears.<param>.<e>``
(:mod:`llmprune.models.experts`), whose weight is that expert's ``[out, in]`` slice.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.bits import pack_bits, unpack_bits
from ..core.errors import UserError
from ..models.experts import expert_of, expert_weight


class SparsityViolation(RuntimeError):
    """The merged model has a nonzero where the pruned model had a zero (or the reverse). This is
    a bug, never a user error: it is raised before anything is written."""


def pruned_weight(model: nn.Module, modules: dict[str, nn.Module], name: str
                  ) -> torch.Tensor | None:
    """The weight ``[out, in]`` that the mask of module name ``name`` keeps: a linear's, or one
    expert's slice of a fused expert parameter (``<owner>.expert_linears.<param>.<e>``, as the
    pruning run names it); None when ``model`` has neither. ``modules``: its named modules."""
    mod = modules.get(name)
    if isinstance(mod, nn.Linear):
        return mod.weight
    return expert_weight(model, name)


def _keep_of(key: str, mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Bool keep mask ``[out, in]`` = ``shape`` from a bool or packed (uint8
    ``[out, ceil(in / 8)]``) mask; UserError when its size is not the weight's."""
    if mask.dtype == torch.uint8:
        if tuple(mask.shape) != (shape[0], (shape[1] + 7) // 8):
            raise UserError(f"the pruning mask {key!r} holds {tuple(mask.shape)} packed bytes, "
                            f"not those of this model's weight {shape}; are the masks from "
                            "another model?")
        mask = unpack_bits(mask, shape[1])
    if mask.numel() != shape[0] * shape[1]:
        raise UserError(f"the pruning mask {key!r} has {mask.numel()} entries, this model's "
                        f"weight {shape}; are the masks from another model?")
    return mask.to(torch.bool).reshape(shape)


def bool_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> bool keep mask ``[out, in]``. ``masks`` may be bool or packed (uint8, as
    :class:`llmprune.calibrate.Report` and ``llmprune_masks.safetensors`` hold them), keyed by
    module name or by ``<module>.weight``; a name is a linear of ``model`` or an expert of one of
    its fused expert parameters (:func:`pruned_weight`)."""
    modules = dict(model.named_modules())
    out = {}
    for key, mask in masks.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        weight = pruned_weight(model, modules, name)
        if weight is None:
            what = "an expert of a fused expert parameter" if expert_of(name) else \
                "a linear layer"
            raise UserError(f"the pruning masks name {key!r}, which is not {what} of this "
                            "model; are the masks from another model?")
        out[name] = _keep_of(key, mask, tuple(weight.shape))
    if not out:
        raise UserError("no pruning masks given: PERP retrains a pruned model with its masks")
    return out


def weight_masks(model: nn.Module, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> the mask the weights themselves have: packed bits of ``keep | (W != 0)``.

    It equals the pruning mask exactly when every pruned position holds zero. Not plain
    ``W != 0``: a kept weight may be exactly 0 (smollm2's GGUF-dequantised weights have many, and
    a 2:4 group with three zeros keeps one of them); training may move it, which is allowed."""
    modules = dict(model.named_modules())
    return {n: pack_bits(keep[n] | (pruned_weight(model, modules, n).detach().cpu() != 0))
            for n in keep}


def check_masks_kept(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> int:
    """Raise :class:`SparsityViolation` unless every mask is the same, bit for bit."""
    bad = [n for n in before if not torch.equal(before[n], after[n])]
    if bad:
        raise SparsityViolation(
            f"PERP put nonzeros where the pruning mask says pruned in {len(bad)} linear(s), "
            f"first {bad[0]}: the merged model is not as sparse as the pruned one; nothing was "
            "written")
    return len(before)


__all__ = ["SparsityViolation", "bool_masks", "check_masks_kept", "pruned_weight", "weight_masks"]
