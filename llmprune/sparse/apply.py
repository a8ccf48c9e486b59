"""Swapping a loaded model's 2:4 linears for :class:`~llmprune.sparse.linear.SparseLinear`
(:func:`apply_kernels`): which linears are 2:4 comes from the checkpoint's llmprune.json and
masks, never from the zeros of the weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError
from .linear import BACKEND_ALIASES, KERNELS, KernelError, SparseLinear, kernels_package

log = logging.getLogger(__name__)


def _names_from_meta(meta: dict, src: Path | None) -> dict[str, torch.Tensor | None]:
    """The 2:4 linears an ``llmprune.json`` names: every tensor of an export (compact or dense)
    stored N:M 2:4 or with pattern 2:4; for a pruning run's own output (target 2:4, no per-tensor
    table) its masks file, else its pruned layers."""
    from ..io.meta import read_masks

    if isinstance(meta.get("tensors"), dict):
        out = {}
        for name, info in meta["tensors"].items():
            nm = info.get("encoding") == "nm" and info.get("n") == 2 and info.get("m") == 4
            if "transposed" in info:
                continue  # a fused expert parameter (3-D), not an nn.Linear's weight
            if nm or info.get("pattern") == "2:4":
                out[name.removesuffix(".weight")] = None
        return out
    if meta.get("target") != "2:4":
        return {}
    masks = read_masks(src) if src is not None else None
    if masks:
        return {name.removesuffix(".weight"): bits for name, bits in masks.items()}
    return {name: None for name in (meta.get("layers") or {})}


def _two_four_names(source) -> tuple[dict[str, torch.Tensor | None], Path | None, dict | None]:
    """Module name -> keep mask (or None: the nonzeros) of every 2:4 linear named by ``source``;
    the compact directory and its metadata when ``source`` is one."""
    from ..io.meta import COMPACT_FORMAT, read_meta

    if isinstance(source, (str, Path)):
        src = Path(source).expanduser()
        meta = read_meta(src) if src.is_dir() else None
        if meta is None:
            raise UserError(f"{source} is not an llmprune checkpoint directory (no llmprune.json)")
        compact_dir = src if meta.get("format") == COMPACT_FORMAT else None
        return _names_from_meta(meta, src), compact_dir, meta
    if isinstance(source, dict) and ("tensors" in source or "target" in source):  # llmprune.json
        return _names_from_meta(source, None), None, source
    if isinstance(source, dict) and all(v is None or isinstance(v, torch.Tensor)
                                        for v in source.values()):
        # keep masks by module or weight name: bool [out, in] or packed bits (Report.masks)
        return {name.removesuffix(".weight"): m for name, m in source.items()}, None, None
    raise UserError("apply_kernels takes a checkpoint directory, its llmprune.json metadata, or a "
                    "dict of keep masks by module name")


def _read_compact(src: Path, meta: dict, name: str, verify: bool):
    """``(values, indices)`` of weight ``name`` straight from the compact shards."""
    from safetensors import safe_open

    from ..core.errors import CorruptCheckpointError
    from ..io.checksums import checksum_algo, tensor_checksum

    info = meta["tensors"][name]
    path = src / info["shard"]
    try:
        with safe_open(str(path), framework="pt") as f:
            parts = {s: f.get_tensor(f"{name}.{s}") for s in ("values", "indices")}
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptCheckpointError(f"cannot read {name} from {path}: {exc}") from None
    if verify:
        algo = checksum_algo(meta)
        for s, t in parts.items():
            if tensor_checksum(t, algo) != info.get(algo, {}).get(s):
                raise CorruptCheckpointError(f"{path} fails the {algo} checksum of tensor "
                                             f"{name}.{s}: re-export the checkpoint")
    return parts["values"], parts["indices"]


def apply_kernels(model: nn.Module, source, kernels: str = "auto", verify: bool = True
                  ) -> nn.Module:
    """Replace every 2:4 ``nn.Linear`` of ``model`` by a :class:`SparseLinear`, in place.

    ``source`` names the 2:4 linears: a compact checkpoint directory (its ``llmprune.json``; the
    compact ``values`` / ``indices`` are then read from its shards as they are, no re-packing,
    sha256-checked unless ``verify=False``), that metadata dict (``meta["tensors"][name]`` with
    ``encoding "nm", n 2, m 4`` or ``pattern "2:4"``), or a dict of keep masks by module or weight
    name (bool ``[out, in]`` or packed, as :class:`llmprune.Report` holds them).

    ``kernels``:

    * ``"auto"`` -- per call the fastest of dense / Triton / torch semi-structured for the device,
      dtype and batch (measured once per GPU and cached); dense on CPU. Without CUDA the modules
      keep the dense weight only (CPU results are bit-identical to the dense model, same memory);
      with CUDA they hold the compact weight (0.5625 x dense) and a dense copy only where dense
      wins for some batch size.
    * ``"dense"`` -- nothing is replaced.
    * ``"triton"`` / ``"cusparselt"`` -- force that backend (compact weight held).

    Returns ``model``.
    """
    from ..io import compact

    if kernels not in KERNELS:
        raise KernelError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "dense":
        return model
    K = kernels_package()
    if kernels == "triton" and not K.triton_installed():
        raise KernelError("kernels='triton' needs Triton: pip install triton")
    if kernels == "cusparselt" and not torch.cuda.is_available():
        raise KernelError("kernels='cusparselt' needs a CUDA GPU (sm80+)")
    names, compact_dir, meta = _two_four_names(source)
    storage = "compact"
    if kernels == "auto" and not torch.cuda.is_available():
        storage = "dense"
    backend = BACKEND_ALIASES.get(kernels, kernels)
    modules = dict(model.named_modules())
    for mod_name, keep in names.items():
        linear = modules.get(mod_name)
        if linear is None:
            raise UserError(f"{mod_name} is not a module of this {type(model).__name__}: the "
                            "checkpoint does not belong to the model")
        if isinstance(linear, SparseLinear):
            continue  # already swapped
        if not isinstance(linear, nn.Linear):
            raise UserError(f"{mod_name} is a {type(linear).__name__}, not an nn.Linear")
        w = linear.weight
        wname = f"{mod_name}.weight"
        if keep is not None and keep.dtype == torch.uint8:
            keep = compact.unpack_bits(keep, w.shape[1]).view(w.shape)
        if meta is not None and wname in meta.get("tensors", {}):
            want = tuple(meta["tensors"][wname]["shape"])
            if want != tuple(w.shape):
                raise UserError(f"{wname} is {tuple(w.shape)} in the model but {want} in the "
                                "checkpoint metadata")
        if storage == "dense":
            new = SparseLinear.from_linear(linear, keep, backend, storage="dense", name=wname)
        elif compact_dir is not None and meta["tensors"].get(wname, {}).get("encoding") == "nm":
            values, indices = _read_compact(compact_dir, meta, wname, verify)
            values = values.to(device=w.device, dtype=w.dtype)
            new = SparseLinear(values, indices.to(w.device), w.shape[1], linear.bias, backend)
        else:
            new = SparseLinear.from_linear(linear, keep, backend, storage="compact", name=wname)
        parent_name, _, child = mod_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
        modules[mod_name] = new
    return model
