"""Finding a decoder's layers, prunable linears and input groups from the model itself.

Nothing here reads a module or parameter name for its meaning:

* the decoder layers are the longest ``nn.ModuleList`` whose members are the model's
  ``_no_split_modules`` classes (the blocks transformers itself never splits across devices),
  else the outermost, longest ``nn.ModuleList`` of modules that hold linears;
* the prunable weights of a layer are its ``nn.Linear`` modules, in module order, less the
  routers of a mixture of experts (a linear with one output per expert, beside the experts);
* the input groups (linears that read the very same tensor, and so share one set of calibration
  statistics) come from watching one forward pass of the layer: every linear's first input is
  recorded and linears whose inputs are the same tensor form a group, in the order of their
  first call (the true-sequential order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .experts import fused_params

# config keys that hold the number of routed experts of a mixture-of-experts layer
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _holds_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def find_layers_path(model: nn.Module) -> str | None:
    """The attribute path of the decoder-layer list of ``model``, or None if it has none."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(path, mod) for path, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) and all(map(_holds_linear, mod))]
    marked = [(p, m) for p, m in lists if all(type(x).__name__ in blocks for x in m)]
    candidates = marked or lists
    if not candidates:
        return None
    # most layers first; among equals the outermost (fewest dots), then the first found
    path, _ = min(candidates, key=lambda pm: (-len(pm[1]), pm[0].count(".")))
    return path


def expert_count(config) -> int | None:
    for key in EXPERT_COUNT_KEYS:
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 1:
            return n
    return None


def _holds_experts(module: nn.Module, experts: int) -> bool:
    """A module of ``experts`` experts: a list of that many, or 3D parameters with one slice per
    expert."""
    if isinstance(module, nn.ModuleList):
        return len(module) == experts
    return bool(fused_params(module, experts))


def one_row_per_expert(module: nn.Module, experts: int) -> bool:
    """Whether every tensor of ``module`` itself (parameters and buffers) has one row per
    expert: the shape of a router (a linear with one output per expert, its bias, a score
    correction)."""
    tensors = [t for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
               if t is not None and t.dim() >= 1]
    return bool(tensors) and all(t.shape[0] == experts for t in tensors)


def is_router(layer: nn.Module, name: str, lin: nn.Linear, experts: int | None) -> bool:
    """A router: a linear with one output per expert beside the experts it routes to (a sibling
    module that holds ``experts`` experts)."""
    if not experts or not one_row_per_expert(lin, experts):
        return False
    parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
    return any(_holds_experts(child, experts) for child in parent.children() if child is not lin)


def prunable_linears(layer: nn.Module, experts: int | None = None) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of one decoder layer by its name inside the layer, in module order,
    except routers (:func:`is_router`; ``experts`` is the model's expert count)."""
    return {name: mod for name, mod in layer.named_modules()
            if isinstance(mod, nn.Linear) and not is_router(layer, name, mod, experts)}


def _tensor_key(x: torch.Tensor) -> tuple:
    # the same storage, offset, shape and strides: the same values (inputs are held alive while
    # watching, so no address is reused)
    return (x.device, x.dtype, x.data_ptr(), tuple(x.shape), x.stride())


def watch_groups(linears: dict[str, nn.Linear], run: Callable[[], object]
                 ) -> tuple[tuple[str, ...], ...]:
    """The input groups of ``linears``, watched during ``run()`` (one forward pass of their
    layer): linears whose first inputs are the same tensor form one group; groups are ordered by
    their first call. A linear the pass never calls (e.g. an expert no token reached) is a group
    of its own, after the others, in module order."""
    first: dict[str, tuple] = {}
    held = []
    hooks = []
    for name, lin in linears.items():
        def hook(_mod, args, _name=name):
            if _name not in first and args and isinstance(args[0], torch.Tensor):
                held.append(args[0])
                first[_name] = _tensor_key(args[0])
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for name, key in first.items():  # dicts keep insertion order: the order of first calls
        groups.setdefault(key, []).append(name)
    out = [tuple(g) for g in groups.values()]
    out += [(name,) for name in linears if name not in first]
    return tuple(out)


def layer_signature(layer: nn.Module, linears: dict[str, nn.Linear]) -> tuple:
    """Layers with the same class and the same linears (names and shapes) are wired alike."""
    return (type(layer).__qualname__,
            tuple((n, tuple(lin.weight.shape)) for n, lin in linears.items()))


__all__ = ["EXPERT_COUNT_KEYS", "expert_count", "find_layers_path", "layer_signature",
           "is_router", "one_row_per_expert", "prunable_linears", "watch_groups"]
