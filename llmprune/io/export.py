"""Writing an export (dense or compact) of a :class:`~llmprune.io.sources.Source`: :func:`export`
encodes its tensors, writes them into shards, and writes the pruning masks file and
``llmprune.json``.

Directory layouts
-----------------
**dense** -- a plain Hugging Face checkpoint: ``config.json``, ``model.safetensors`` (or
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``), tokenizer files, plus
``llmprune_masks.safetensors`` (the keep masks of the pruning run, 1 bit per weight) and
``llmprune.json``. ``AutoModelForCausalLM.from_pretrained`` loads it as it is.

**compact** -- ``config.json`` (the model's own), tokenizer files,
``llmprune-0000k-of-0000n.safetensors`` shards holding every tensor in the encoding of
:mod:`llmprune.io.compact` chosen for it, and ``llmprune.json`` (format version, every tensor's
encoding, pattern, shape, dtype and shard, the recipe, a checksum of every stored tensor (xxh3-128
since format version 2, sha256 in version 1, which is still read), the sha256 of every shard's
header, and every shard's size).
Each shard's safetensors header repeats the format version and its tensors' encodings.
It also holds a ``model.safetensors.index.json`` whose every entry points at a file named
``LLMPRUNE-COMPACT-CHECKPOINT--load-it-with-llmprune.load_pretrained``, which does not exist: plain
``from_pretrained`` then fails with that name in its error instead of loading garbage.
:func:`llmprune.load_pretrained` restores the dense pruned weights bit for bit
(reading it through :mod:`llmprune.io.compact_reader`).

Exports stream: tensors are read from the source one at a time and written into their shard as
soon as they are encoded (:class:`~llmprune.io.shards.ShardWriter`), so peak memory is a few
tensors, not a shard. Output goes to a temporary sibling directory that is renamed into place
only after ``llmprune.json`` (written last) is complete. Nothing here uses pickle.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.errors import CorruptCheckpointError, UserError
from . import checksums, compact
from .checksums import header_sha256
from .meta import (COMPACT_FORMAT, DENSE_FORMAT, STACKED_EXPERTS_VERSION, write_masks,
                   write_meta)
from .shards import ShardWriter, parse_size
from .sources import Source

SIGNPOST = "LLMPRUNE-COMPACT-CHECKPOINT--load-it-with-llmprune.load_pretrained"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_export_args(fmt: str, dtype: str, fmt_flag: str = "--format",
                      dtype_flag: str = "--dtype") -> None:
    if fmt not in ("dense", "compact"):
        raise UserError(f"{fmt_flag} must be dense or compact, got {fmt!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"{dtype_flag} must be auto, bf16, fp16 or fp32, got {dtype!r}")


def _config_with_dtype(config: dict, dtype: torch.dtype) -> dict:
    config = dict(config)
    name = _DTYPE_NAMES[dtype]
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    if "torch_dtype" not in config and "dtype" not in config:
        config["dtype"] = name
    config.pop("quantization_config", None)
    return config


def format_version(source: Source) -> int:
    """The compact format version an export of ``source`` is written in: the oldest that holds
    it (fused experts stored stacked need version 3; llmprune before it reads version 2)."""
    return STACKED_EXPERTS_VERSION if source.stacked else 2


def export(source: Source, out_dir: Path, fmt: str = "compact", dtype: str = "auto",
           max_shard_size: str | int = "5GB", progress: bool = True,
           on_shard_written: Callable[[int], None] | None = None) -> dict:
    """Write ``source`` into ``out_dir`` (a fresh temporary directory the caller renames).
    ``on_shard_written(n)`` is called once shard ``n`` (counted from 1) is complete on disk."""
    check_export_args(fmt, dtype)
    want = DTYPES.get(dtype)
    t0 = time.perf_counter()
    header = {"format": "pt"}
    if fmt == "compact":
        header.update(llmprune_format=COMPACT_FORMAT,
                      llmprune_format_version=str(format_version(source)))
    writer = ShardWriter(out_dir, "llmprune" if fmt == "compact" else "model",
                          parse_size(max_shard_size), header, source.count, on_shard_written)
    try:
        return _export(source, out_dir, fmt, want, writer, t0, progress)
    finally:
        writer.close()


def check_mask_shape(name: str, keep: torch.Tensor, flat: torch.Tensor,
                     t: torch.Tensor) -> None:
    """That ``keep`` (bool, or packed 1 bit per weight) covers ``flat``, the 2-D matrix of
    tensor ``name`` (``t`` itself, or its experts stacked)."""
    want_shape = tuple(flat.shape) if keep.dtype != torch.uint8 else \
        (*flat.shape[:-1], (flat.shape[-1] + 7) // 8)
    if tuple(keep.shape) != want_shape or (keep.dtype == torch.uint8 and flat.dim() != 2):
        shown = tuple(keep.shape) if keep.dtype != torch.uint8 else \
            (*keep.shape[:-1], f"{keep.shape[-1]} bytes")
        raise CorruptCheckpointError(f"mask of {name} has shape {shown} but the weight "
                                     f"is {tuple(t.shape)}")


def masks_file_entries(name: str, keep: torch.Tensor, flat: torch.Tensor, experts: int | None
                       ) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
    """The masks file's entries (weight name -> (packed keep bits ``[out, ceil(in / 8)]``,
    ``(out, in)``)) of tensor ``name`` whose keep mask ``keep`` covers ``flat`` (``[out, in]``,
    or the ``experts`` matrices of a fused expert parameter stacked, ``[E * out, in]``):
    one entry for a matrix, one per expert for a fused parameter, named as the pruning run names
    them (``<owner>.expert_linears.<param>.<e>.weight``)."""
    from ..models.experts import expert_name

    bits = torch.from_numpy(compact.as_bits(keep, flat.shape[1]))
    if experts is None:
        return {name: (bits, tuple(flat.shape))}
    rows = flat.shape[0] // experts
    return {f"{expert_name(name, e)}.weight": (bits[e * rows:(e + 1) * rows].clone(),
                                                (rows, flat.shape[1])) for e in range(experts)}


def _export(source: Source, out_dir: Path, fmt: str, want: torch.dtype | None,
            writer: ShardWriter, t0: float, progress: bool) -> dict:
    from tqdm.auto import tqdm

    masks = source.masks
    tensors: dict[str, dict] = {}
    out_masks: dict[str, torch.Tensor] = {}
    mask_shapes: dict[str, tuple] = {}
    stored_dtype = None
    total = dense_total = 0
    for name, t in tqdm(source.tensors, desc=f"export {fmt}", unit="tensor", disable=not progress):
        if want is not None and t.is_floating_point():
            t = t.to(want)
        if t.is_floating_point():
            stored_dtype = stored_dtype or t.dtype
        keep = masks.get(name) if masks else None  # bool, or packed: kept packed (cheaper)
        transposed = source.stacked.get(name) if keep is not None and t.dim() == 3 else None
        # the matrix the mask covers: [out, in], or a fused expert parameter's experts stacked
        flat = t if transposed is None else compact.stack_experts(t, transposed)
        if keep is not None:
            check_mask_shape(name, keep, flat, t)
        if fmt == "compact":
            enc = compact.choose(flat, keep, source.nm)
        else:
            enc = compact.Encoded("plain", {"": t.contiguous()}, tuple(t.shape))
        if keep is not None and not compact.pruned_are_zero(flat, keep, enc):
            raise UserError(f"{name} has nonzero weights where the pruning mask says pruned: "
                            "the checkpoint was changed after pruning; re-prune it, or export "
                            "with --pattern to take the masks from its zeros")
        if keep is not None and fmt == "dense":
            for key, (bits, shape) in masks_file_entries(
                    name, keep, flat, None if transposed is None else t.shape[0]).items():
                out_masks[key], mask_shapes[key] = bits, shape
        is_nm = source.nm is not None and keep is not None and (enc.encoding == "nm" or (
            flat.dim() == 2 and compact.nm_fits(compact.as_bool(keep, flat.shape[1]),
                                                *source.nm)))
        pattern = "dense" if keep is None else (
            f"{source.nm[0]}:{source.nm[1]}" if is_nm else "unstructured")
        info = {"encoding": enc.encoding, "pattern": pattern, "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."), "bytes": enc.nbytes,
                "dense_bytes": t.numel() * t.element_size()}
        if transposed is not None and fmt == "compact":
            info["transposed"] = transposed
        if keep is not None:
            # over the weight's elements: a packed mask has 1/8 as many (bytes, not bits)
            kept = int(enc.parts["row_offsets"][-1]) if enc.encoding == "bitmask" else \
                compact.count_true(keep)  # the bitmask's offsets already counted its mask
            info["sparsity"] = 1.0 - kept / max(t.numel(), 1)
        if enc.encoding == "nm":
            info.update(n=enc.n, m=enc.m)
        writer.add(name, enc, info)
        tensors[name] = info
        total += enc.nbytes
        dense_total += info["dense_bytes"]
        del t, flat, keep, enc
    if fmt == "dense":
        for key, shape in source.expert_shapes.items():
            if key not in out_masks and key in masks:
                out_masks[key] = torch.from_numpy(compact.as_bits(masks[key], shape[1]))
                mask_shapes[key] = shape
    shard_names = writer.finish("model.safetensors" if fmt == "dense" else None)
    for name, info in tensors.items():
        info["shard"] = shard_names[writer.tensor_shard[name]]
        info[checksums.TENSOR_CHECKSUM] = {key.removeprefix(name).lstrip("."): writer.hashes[key]
                                 for key in compact.stored_keys(name, info["encoding"])}

    config = _config_with_dtype(source.config, stored_dtype or torch.float32)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in source.copy_files:
        shutil.copy2(path, out_dir / path.name)
    if fmt == "dense":
        if len(shard_names) > 1:
            weight_map = {k: shard_names[i] for k, i in writer.where.items()}
            (out_dir / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        if out_masks:
            write_masks(out_dir, out_masks, mask_shapes)
    else:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"format": COMPACT_FORMAT, "note": "compact llmprune checkpoint: load it "
                          "with llmprune.load_pretrained(DIR)"},
             "weight_map": {name: SIGNPOST for name in tensors}}, indent=2) + "\n")

    shards = {}
    for name in shard_names:
        head_sha, head_len = header_sha256(out_dir / name)
        shards[name] = {"bytes": (out_dir / name).stat().st_size, "header_bytes": head_len,
                        "header_sha256": head_sha}
    src_meta = source.meta or {}
    meta = {
        "format": COMPACT_FORMAT if fmt == "compact" else DENSE_FORMAT,
        "format_version": format_version(source),
        "tensor_checksum": checksums.TENSOR_CHECKSUM,
        "dtype": str(stored_dtype or torch.float32).removeprefix("torch."),
        # the pruning run this came from (recipe, per-layer sparsity, calibration, versions)
        "source_meta": src_meta.get("source_meta", src_meta) if fmt == "compact" else None,
        "shards": shards,
        "tensors": tensors,
        "totals": {"tensor_bytes": total, "dense_tensor_bytes": dense_total,
                   "file_bytes": sum(s["bytes"] for s in shards.values())},
        "export_seconds": time.perf_counter() - t0,
    }
    if fmt == "dense":  # keep the pruning run's own fields at the top, as prune writes them
        meta = {**{k: v for k, v in src_meta.items() if k not in meta}, **meta}
        meta["format"] = DENSE_FORMAT
        meta.pop("source_meta")
    if src_meta.get("recipe"):
        meta["recipe"] = src_meta["recipe"]
    write_meta(out_dir, meta)  # last: marks complete
    return meta
