"""PERP adapters on fused mixture-of-experts parameters (``--train experts``).

transformers 5 stores most families' experts as one 3D parameter per projection, ``[E, out, in]``
(gpt-oss: ``[E, in, out]``), which no ``nn.Linear`` wraps, so peft's LoRA layers cannot. Each
pruned fused parameter gets one low-rank adapter per expert instead, applied with
``torch.nn.utils.parametrize``: the experts module reads the reparametrised weight in its own
forward, and the merge writes it in place (``remove_parametrizations(leave_parametrized=True)``).
Per expert ``e``, with its keep mask ``M_e`` and the formulas of PERP Sec. 3 (Zimmer et al. 2023,
arXiv:2312.15230; :func:`llmprune.retrain.perp.masklora_weight` / ``scalelora_weight``):

    MaskLoRA:   W'_e = W_e + (s B_e A_e) ⊙ M_e      A_e [r, in], B_e [out, r] = 0 at init
    ScaleLoRA:  W'_e = (B_e A_e) ⊙ W_e              B_e A_e = 1 at init

batched over the experts (``A [E, r, in]``, ``B [E, out, r]``). Pruned weights stay zero by
construction, as for the linears. While training, one reparametrised copy of each fused
parameter is held per forward (the module reads it once per forward inside
:func:`torch.nn.utils.parametrize.cached`), so this costs about one extra copy of the experts'
weights in memory; it is opt-in for that reason.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..models.experts import expert_of, fused_params, stores_transposed


class ExpertAdapter(nn.Module):
    """The parametrisation of one fused expert parameter: ``forward(W)`` is ``W`` with every
    expert's MaskLoRA / ScaleLoRA update, in ``W``'s own layout."""

    def __init__(self, keep: torch.Tensor, rank: int, alpha: float, variant: str,
                 transposed: bool, dtype: torch.dtype):
        super().__init__()
        experts, out, inp = keep.shape  # keep: bool [E, out, in]
        self.variant, self.transposed = variant, transposed
        self.scaling = alpha / rank
        self.register_buffer("keep", keep, persistent=False)
        self.lora_A = nn.Parameter(torch.empty(experts, rank, inp, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(experts, out, rank, dtype=dtype))
        with torch.no_grad():
            if variant == "masklora":
                # LoRA's init (Hu et al. 2022, as peft's): A Kaiming-uniform, B = 0, so W' = W
                bound = 1.0 / math.sqrt(inp)
                self.lora_A.uniform_(-bound, bound)
                self.lora_B.zero_()
            else:
                # B A = 1: B = 1/r, A = 1 + N with the r rows of N summing to 0 in every column
                noise = torch.randn(experts, rank, inp) * 0.02
                noise -= noise.mean(dim=1, keepdim=True)
                self.lora_A.copy_(1.0 + noise)
                self.lora_B.fill_(1.0 / rank)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.transpose(1, 2) if self.transposed else weight  # [E, out, in]
        prod = torch.bmm(self.lora_B, self.lora_A)  # [E, out, in]
        if self.variant == "masklora":
            w = w.to(prod.dtype) + prod * self.scaling * self.keep.to(prod.dtype)
        else:
            w = w.to(prod.dtype) * prod + 0.0  # + 0.0: a pruned -0.0 becomes +0.0
        w = w.to(weight.dtype)
        return w.transpose(1, 2) if self.transposed else w


def fused_keep(model: nn.Module, keep: dict[str, torch.Tensor]
               ) -> dict[tuple[str, str], tuple[torch.Tensor, bool]]:
    """(experts module name, parameter name) -> (bool keep ``[E, out, in]``, whether the
    parameter stores ``[E, in, out]``), for every fused parameter whose every expert has a mask
    in ``keep`` (module name -> bool ``[out, in]``, as :func:`perp_masks.bool_masks` gives)."""
    by_param: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, mask in keep.items():
        found = expert_of(name)
        if found is not None:
            by_param.setdefault(found[:2], {})[found[2]] = mask
    out = {}
    for (owner, param), masks in by_param.items():
        module = model.get_submodule(owner)
        w = getattr(module, param)
        if sorted(masks) != list(range(w.shape[0])):
            continue
        transposed = stores_transposed(module, fused_params(module, w.shape[0]),
                                       model.config.hidden_size)
        out[(owner, param)] = (torch.stack([masks[e] for e in range(w.shape[0])]), transposed)
    return out


def add_expert_adapters(model: nn.Module, keep: dict[str, torch.Tensor], rank: int,
                        alpha: float, variant: str) -> list[nn.Parameter]:
    """Register an :class:`ExpertAdapter` on every pruned fused expert parameter of ``model``;
    returns the adapters' parameters (to train)."""
    params = []
    for (owner, param), (mask, transposed) in fused_keep(model, keep).items():
        module = model.get_submodule(owner)
        w = getattr(module, param)
        adapter = ExpertAdapter(mask.to(w.device), rank, alpha, variant,
                                transposed, w.dtype).to(w.device)
        parametrize.register_parametrization(module, param, adapter)
        params += [adapter.lora_A, adapter.lora_B]
    return params


def merge_expert_adapters(model: nn.Module) -> None:
    """Write every expert adapter's weight into its fused parameter and remove the adapter."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for param in list(module.parametrizations.keys()):
                if isinstance(module.parametrizations[param][0], ExpertAdapter):
                    with torch.no_grad():
                        parametrize.remove_parametrizations(module, param,
                                                            leave_parametrized=True)


def adapters_active(model: nn.Module):
    """A context in which each reparametrised expert weight is computed once per forward, not
    once per expert the module indexes; a no-op without expert adapters."""
    if any(isinstance(m, ExpertAdapter) for m in model.modules()):
        return parametrize.cached()
    return contextlib.nullcontext()


__all__ = ["ExpertAdapter", "adapters_active", "add_expert_adapters", "fused_keep",
           "merge_expert_adapters"]
