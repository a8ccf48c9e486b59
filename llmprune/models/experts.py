"""Fused mixture-of-experts weights seen as one linear per expert.

transformers 5 stores the experts of most MoE families as 3D parameters ``[experts, out, in]``
(``is_transposed``: ``[experts, in, out]``), gate and up fused in one of them, and runs each
expert as ``F.linear(tokens, W[e])`` (or ``tokens @ W[e]``, or one ``bmm`` over all experts).
Inside :func:`expert_linears`, every such parameter gets one :class:`ExpertLinear` per expert:
an ``nn.Linear`` without weights of its own whose ``weight`` is the view ``W[e]`` (``W[e].T``),
so the calibration engine sees plain linears:

* while the experts module runs, a ``TorchFunctionMode`` sends each of those products through the
  expert's ExpertLinear, so its hooks see exactly the tokens routed to that expert (an expert no
  calibration token reaches gets no statistics);
* with ``calibrate="all"`` every token is also run through every expert once, routed with
  weight 1 to all of them, while a calibration pass watches the experts: the ExpertLinears' hooks
  see every token, and that pass's output is thrown away. The experts module's output still
  comes from the real routing (:func:`all_experts_args`);
* a solver's result written into ``ExpertLinear.weight`` lands in the fused parameter, so the
  model saves in its family's own layout and loads with plain ``from_pretrained``;
* an ExpertLinear holds no parameter, so ``state_dict`` and ``.to(dtype)`` see only the fused one.

Routers are not expert parameters (their first dimension is not one per expert), so they stay
dense.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HOLDER = "expert_linears"  # the child module of an experts module that holds its ExpertLinears
# which tokens calibrate an expert: those the router sends to it, or every calibration token
MOE_CALIBRATE = ("routed", "all")


class ExpertLinear(nn.Linear):
    """Expert ``index`` of the fused parameter ``param`` of ``owner``, as an ``nn.Linear``."""

    def __init__(self, owner: nn.Module, param: str, index: int, transposed: bool):
        nn.Module.__init__(self)
        w = getattr(owner, param)
        self.out_features, self.in_features = (w.shape[2], w.shape[1]) if transposed \
            else (w.shape[1], w.shape[2])
        self.param, self.index, self.transposed = param, index, transposed
        self.bias = None
        object.__setattr__(self, "owner", owner)  # a plain reference: not a submodule

    @property
    def weight(self) -> torch.Tensor:  # [out, in], a view of the owner's fused parameter
        w = getattr(self.owner, self.param)[self.index]
        return w.T if self.transposed else w

    def extra_repr(self) -> str:
        return f"{self.param}[{self.index}], in_features={self.in_features}, " \
               f"out_features={self.out_features}"


def fused_params(module: nn.Module, experts: int) -> list[str]:
    """The names of ``module``'s own 3D parameters with one slice per expert."""
    return [n for n, p in module.named_parameters(recurse=False)
            if p.dim() == 3 and p.shape[0] == experts]


def stores_transposed(module: nn.Module, params: list[str], hidden: int) -> bool:
    """Whether ``module`` stores ``[experts, in, out]``: its own flag (transformers' experts
    implementations set ``is_transposed``), else whether its first fused parameter (the one that
    reads the hidden state) has the hidden size as its second dimension."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    first = getattr(module, params[0])
    return first.shape[1] == hidden and first.shape[2] != hidden


def _same_view(w: torch.Tensor, p: torch.Tensor) -> int | None:
    """The expert whose slice ``p[e]`` is the tensor ``w``, else None."""
    if (w.device != p.device or w.dtype != p.dtype or tuple(w.shape) != tuple(p.shape[1:])
            or w.stride() != p.stride()[1:]
            or w.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()):
        return None
    e, rest = divmod(w.storage_offset() - p.storage_offset(), p.stride(0))
    return e if rest == 0 and 0 <= e < p.shape[0] else None


def _is_whole(w: torch.Tensor, p: torch.Tensor) -> bool:
    return (w.shape == p.shape and w.stride() == p.stride()
            and w.storage_offset() == p.storage_offset()
            and w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr())


class _Route(TorchFunctionMode):
    """Sends the expert products of one experts module through its ExpertLinears."""

    def __init__(self, module: nn.Module):
        super().__init__()
        holder = getattr(module, HOLDER)
        self.params = [(getattr(module, name), holder[name]) for name in holder]

    def _expert(self, w, transposed: bool):
        if not isinstance(w, torch.Tensor):
            return None
        for p, lins in self.params:
            if lins[0].transposed == transposed:
                e = _same_view(w, p)
                if e is not None:
                    return lins[e]
        return None

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            lin = self._expert(args[1], transposed=False)
            if lin is not None:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                y = lin(args[0])
                return y if bias is None else y + bias
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) \
                and len(args) == 2 and not kwargs:
            lin = self._expert(args[1], transposed=True)
            if lin is not None:
                return lin(args[0])
        elif func in (torch.bmm, torch.Tensor.bmm) and len(args) == 2 and not kwargs:
            for p, lins in self.params:
                if lins[0].transposed and _is_whole(args[1], p):  # [E, T, in] @ [E, in, out]
                    return torch.stack([lin(x) for lin, x in zip(lins, args[0])])
        return func(*args, **kwargs)


def _routed_forward(self, *args, **kwargs):
    with _Route(self):
        return type(self).forward(self, *args, **kwargs)


def all_experts_args(args: tuple, kwargs: dict, experts: int) -> tuple[tuple, dict] | None:
    """The call ``experts_module(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``
    (positional or keyword) rewritten to send every token to every expert with weight 1:
    ``top_k_index`` becomes ``[T, E]`` = 0 .. E-1 in every row, ``top_k_weights`` ``[T, E]`` of
    ones. The index is the first integer tensor of two dimensions after the hidden state, the
    weights the floating tensor of its shape. None when the call has no such routing (Llama 4's
    experts take the tokens alone, already scaled by their router scores)."""
    slots = [*((i, a) for i, a in enumerate(args) if i > 0), *kwargs.items()]
    tensors = [(k, t) for k, t in slots if isinstance(t, torch.Tensor) and t.dim() == 2]
    index = next(((k, t) for k, t in tensors
                  if not t.is_floating_point() and t.dtype != torch.bool), None)
    if index is None:
        return None
    weights = next(((k, t) for k, t in tensors
                    if t.is_floating_point() and t.shape == index[1].shape), None)
    if weights is None:
        return None
    tokens = index[1].shape[0]
    every = torch.arange(experts, device=index[1].device, dtype=index[1].dtype)
    new = {index[0]: every.expand(tokens, experts),  # [T, E]
           weights[0]: weights[1].new_ones(tokens, experts)}  # [T, E]
    return (tuple(new.get(i, a) for i, a in enumerate(args)),
            {k: new.get(k, v) for k, v in kwargs.items()})


def _watched(module: nn.Module) -> bool:
    """Whether a calibration pass watches ``module``'s experts: a forward pre-hook on one of
    its ExpertLinears (the engine's statistics hooks)."""
    return any(lin._forward_pre_hooks for lins in getattr(module, HOLDER).values()
               for lin in lins)


def _all_tokens_forward(self, *args, **kwargs):
    """``calibrate="all"``: while a calibration pass watches, every token runs through every
    expert through the ExpertLinears (their hooks see all tokens; the output is discarded), then
    the real routing computes the output on the fused weights (no hook sees those products).
    Unwatched (the propagation pass), or without routing arguments, as ``_routed_forward``."""
    experts = getattr(self, HOLDER)
    count = len(next(iter(experts.values())))
    every = all_experts_args(args, kwargs, count)
    if every is None or not _watched(self):
        return _routed_forward(self, *args, **kwargs)
    with _Route(self):
        type(self).forward(self, *every[0], **every[1])
    return type(self).forward(self, *args, **kwargs)


def expert_of(name: str) -> tuple[str, str, int] | None:
    """``(owner, param, e)`` for the module name of an ExpertLinear,
    ``<owner>.expert_linears.<param>.<e>`` (as the engine names its pruned linears and their
    masks); None for any other name."""
    head, sep, tail = name.rpartition(f".{HOLDER}.")
    param, _, index = tail.partition(".")
    if not sep or not param or not index.isdigit():
        return None
    return head, param, int(index)


def expert_name(param_name: str, e: int) -> str:
    """The ExpertLinear module name of expert ``e`` of the fused parameter ``param_name``
    (``<owner>.<param>`` -> ``<owner>.expert_linears.<param>.<e>``); inverse of :func:`expert_of`."""
    owner, _, param = param_name.rpartition(".")
    return f"{owner}.{HOLDER}.{param}.{e}"


@dataclass(frozen=True)
class FusedMask:
    """The keep mask of one fused expert parameter: ``bits`` uint8 ``[E * out, ceil(in / 8)]``,
    each expert's packed keep bits ``[out, ceil(in / 8)]`` (its ExpertLinear's, as an
    ``nn.Linear``) stacked expert after expert; ``transposed``: the parameter stores each
    expert as ``[in, out]`` (its shape is ``[E, in, out]``), else ``[out, in]``."""

    bits: torch.Tensor
    transposed: bool


def fused_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, FusedMask]:
    """The fused expert parameters of ``model`` whose every expert has a mask in ``masks``
    (module name -> packed keep bits), by parameter name (``<owner>.<param>``)."""
    by_param: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, bits in masks.items():
        found = expert_of(name)
        if found is not None:
            by_param.setdefault(found[:2], {})[found[2]] = bits
    out = {}
    for (owner, param), experts in by_param.items():
        module = model.get_submodule(owner)
        w = getattr(module, param)  # [E, out, in] or [E, in, out]
        if sorted(experts) != list(range(w.shape[0])):
            continue  # not every expert was pruned: the parameter stays plain
        transposed = stores_transposed(module, fused_params(module, w.shape[0]),
                                 model.config.hidden_size)
        out[f"{owner}.{param}"] = FusedMask(torch.cat([experts[e] for e in range(w.shape[0])]),
                                            transposed)
    return out


def expert_weight(model: nn.Module, name: str) -> torch.Tensor | None:
    """The weight ``[out, in]`` (a view of the fused parameter, ``W[e]`` or ``W[e].T``) of the
    expert that the ExpertLinear name ``name`` (``<owner>.expert_linears.<param>.<e>``, as the
    pruning run names its masks) denotes in ``model``, outside :func:`expert_linears`; None when
    ``name`` is no such name or ``model`` has no such expert (no module ``owner``, no 3D
    parameter ``param`` of it, or fewer experts than ``e + 1``)."""
    found = expert_of(name)
    if found is None:
        return None
    owner, param, e = found
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    w = getattr(module, param, None)  # [E, out, in] or [E, in, out]
    if not isinstance(w, nn.Parameter) or w.dim() != 3 or not 0 <= e < w.shape[0]:
        return None
    transposed = stores_transposed(module, fused_params(module, w.shape[0]),
                                   model.config.hidden_size)
    return w[e].T if transposed else w[e]


@contextlib.contextmanager
def eager_experts(config):
    """Within the block the model runs its experts with their eager per-expert loop
    (transformers' ``config._experts_implementation``), whatever kernel it would pick."""
    if not hasattr(config, "_experts_implementation"):
        yield
        return
    saved = config._experts_implementation
    config._experts_implementation = "eager"
    try:
        yield
    finally:
        config._experts_implementation = saved


@contextlib.contextmanager
def expert_linears(layers: nn.ModuleList, experts: int | None, config, calibrate: str = "routed"):
    """Within the block, every experts module of ``layers`` (a module with 3D parameters of
    ``experts`` slices) holds one :class:`ExpertLinear` per expert and fused parameter, in a
    child ``expert_linears.<param>.<e>``, and routes its products through them; the model runs
    its experts eagerly (``config._experts_implementation``). ``calibrate`` (one of
    :data:`MOE_CALIBRATE`): ``"routed"``, each expert's hooks see the tokens routed to it;
    ``"all"``, every token (see the module docstring). Everything is undone on exit."""
    if calibrate not in MOE_CALIBRATE:
        raise ValueError(f"calibrate must be one of {MOE_CALIBRATE}, got {calibrate!r}")
    forward = _all_tokens_forward if calibrate == "all" else _routed_forward
    if not experts:
        yield
        return
    installed = []
    try:
        for layer in layers:
            for module in list(layer.modules()):
                params = fused_params(module, experts)
                if not params or isinstance(module, ExpertLinear):
                    continue
                transposed = stores_transposed(module, params, config.hidden_size)
                module.add_module(HOLDER, nn.ModuleDict({
                    name: nn.ModuleList(ExpertLinear(module, name, e, transposed)
                                        for e in range(experts)) for name in params}))
                module.forward = types.MethodType(forward, module)
                installed.append(module)
        with eager_experts(config) if installed else contextlib.nullcontext():
            yield
    finally:
        for module in installed:
            delattr(module, HOLDER)
            del module.forward


__all__ = ["ExpertLinear", "FusedMask", "HOLDER", "MOE_CALIBRATE", "all_experts_args",
           "eager_experts", "expert_linears", "expert_name", "expert_of", "expert_weight",
           "fused_masks", "fused_params", "stores_transposed"]
