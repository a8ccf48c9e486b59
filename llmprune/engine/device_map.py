"""``--device-map auto``: spread one decoder layer over several devices.

The calibration engine keeps one decoder layer on the compute device at a time. When one layer
plus its activations does not fit on one GPU, ``--device-map auto`` places the layer's
submodules (down to single linears) over all visible GPUs: accelerate's planner
(``infer_auto_device_map``, with ``max_memory`` per device) chooses where each submodule goes,
each placed submodule gets a forward pre-hook that moves its inputs to its device and a forward
hook that moves its output back to the device the input came from. The residual stream and the
calibration activations therefore stay on the main device (``--device``, e.g. ``cuda:0``),
every linear's statistics (Hessian) live and are solved on that linear's device, and only one
hidden-state-sized tensor crosses devices per placed submodule. Submodules the GPUs cannot hold
go to the CPU and run there (slowly); the planner never offloads to disk here.

On a machine without CUDA (or with ``--device cpu``) the map degrades to the CPU: the layer
runs exactly as without ``--device-map``, with the same results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..core.errors import UserError

log = logging.getLogger(__name__)

DEVICE_MAPS = ("auto",)
# Fraction of each GPU's free memory the planner may fill with weights; the rest is left for
# the calibration activations, the statistics and the solver's working copies.
GPU_WEIGHT_FRACTION = 0.5


def check_device_map(device_map: str | None) -> None:
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise UserError(f"--device-map must be 'auto' (or left out for one device), got "
                        f"{device_map!r}")


def layer_placement(device_map: str | None, device: str,
                    max_memory: dict | None = None) -> "LayerPlacement | None":
    """The placement for ``--device-map``; None when not given (one device, the default)."""
    check_device_map(device_map)
    if device_map is None:
        return None
    gpus = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if not gpus:
        log.info("--device-map auto: no CUDA device in use, every layer stays on %s", device)
    return LayerPlacement(main=torch.device(device if device != "cuda" else "cuda:0"),
                          use_gpus=gpus, max_memory=max_memory)


def _default_max_memory() -> dict:
    budget = {}
    for i in range(torch.cuda.device_count()):
        free, _total = torch.cuda.mem_get_info(i)
        budget[i] = int(free * GPU_WEIGHT_FRACTION)
    budget["cpu"] = 1 << 50  # whatever the GPUs cannot hold runs on the CPU
    return budget


def _first_tensor_device(args, kwargs) -> torch.device | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


@dataclass
class LayerPlacement:
    """Puts a decoder layer on its devices (:meth:`place`) and back on the CPU (:meth:`release`).
    ``plan`` (submodule name -> device) overrides the planner, e.g. in tests."""

    main: torch.device
    use_gpus: bool
    max_memory: dict | None = None
    plan: dict | None = None
    _handles: list = field(default_factory=list)

    def plan_for(self, layer: nn.Module) -> dict:
        if self.plan is not None:
            return dict(self.plan)
        if not self.use_gpus:
            return {"": self.main}
        from accelerate import infer_auto_device_map

        plan = infer_auto_device_map(layer, max_memory=self.max_memory or _default_max_memory())
        if any(d == "disk" for d in plan.values()):
            raise UserError("--device-map auto: one decoder layer does not fit in the GPUs' and "
                            "the CPU's memory; free memory or use a bigger machine")
        on_cpu = [n for n, d in plan.items() if d == "cpu"]
        if on_cpu:
            log.warning("--device-map auto: %s do not fit on the GPUs and run on the CPU",
                        ", ".join(on_cpu))
        return plan

    def place(self, layer: nn.Module) -> None:
        plan = self.plan_for(layer)
        devices = {torch.device(f"cuda:{d}" if isinstance(d, int) else d) for d in plan.values()}
        if len(devices) == 1 and "" in plan:
            layer.to(devices.pop())
            return
        layer.to(self.main)  # whatever the plan does not name (buffers, parameter-free modules)
        for name, dev in plan.items():
            dev = torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
            sub = layer.get_submodule(name) if name else layer
            sub.to(dev)
            if name and any(True for _ in sub.parameters()):
                self._handles.extend(_attach(sub, dev))

    def release(self, layer: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        layer.to("cpu")


def _attach(module: nn.Module, device: torch.device) -> list:
    """Hooks that run ``module`` on ``device`` and hand its output back where its input was."""
    from accelerate.utils import send_to_device

    source: list[torch.device | None] = [None]

    def pre(_mod, args, kwargs):
        source[0] = _first_tensor_device(args, kwargs)
        return send_to_device(args, device), send_to_device(kwargs, device)

    def post(_mod, _args, _kwargs, output):
        return output if source[0] is None else send_to_device(output, source[0])

    # registered before the engine's statistics hooks, so those see inputs already moved
    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True)]
