"""Exports (dense and compact), the compact loader, and the pruning masks file.

Directory layouts
-----------------
**dense** -- a plain Hugging Face checkpoint: ``config.json``, ``model.safetensors`` (or
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``), tokenizer files, plus
``llmprune_masks.safetensors`` (the keep masks of the pruning run, 1 bit per weight) and
``llmprune.json``. ``AutoModelForCausalLM.from_pretrained`` loads it as it is.

**compact** -- ``config.json`` (the model's own), tokenizer files,
``llmprune-0000k-of-0000n.safetensors`` shards holding every tensor in the encoding of
:mod:`llmprune.compact` chosen for it, and ``llmprune.json`` (format version, every tensor's
encoding, pattern, shape, dtype and shard, the recipe, a checksum of every stored tensor (xxh3-128
since format version 2, sha256 in version 1, which is still read), the sha256 of every shard's
header, and every shard's size).
Each shard's safetensors header repeats the format version and its tensors' encodings.
It also holds a ``model.safetensors.index.json`` whose every entry points at a file named
``LLMPRUNE-COMPACT-CHECKPOINT--load-it-with-llmprune.load_pretrained``, which does not exist: plain
``from_pretrained`` then fails with that name in its error instead of loading garbage.
:func:`load_pretrained` restores the dense pruned weights bit for bit.

Exports stream: tensors are read from the source one at a time and written into their shard as
soon as they are encoded (the checksum and the write on a second thread, overlapping the
encoding of the next), so peak memory is a few tensors, not a shard. Output goes to a temporary
sibling directory that is renamed into place only after ``llmprune.json`` (written last) is
complete. Nothing here uses pickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.errors import CorruptCheckpointError, UserError
from ..core.sparsity import Sparsity
from . import checksums, compact
from .checksums import checksum_algo, checksum_bytes, hasher, header_sha256, tensor_checksum
from .meta import (COMPACT_FORMAT, DENSE_FORMAT, MASKS_FILE, META_FILE, STACKED_EXPERTS_VERSION,
                   is_compact, nm_of, read_masks, read_meta, write_masks, write_meta)
from .safetensors import (ST_NAMES, WEIGHT_FILE_RE, SafetensorsFiles, checkpoint_files,
                          iter_safetensors)

log = logging.getLogger(__name__)

SIGNPOST = "LLMPRUNE-COMPACT-CHECKPOINT--load-it-with-llmprune.load_pretrained"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_export_args(fmt: str, dtype: str, fmt_flag: str = "--format",
                      dtype_flag: str = "--dtype") -> None:
    if fmt not in ("dense", "compact"):
        raise UserError(f"{fmt_flag} must be dense or compact, got {fmt!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"{dtype_flag} must be auto, bf16, fp16 or fp32, got {dtype!r}")


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise UserError(f"--max-shard-size must look like 5GB, 500MB or 2GiB, got {text!r}")
    number, unit, suffix = match.groups()
    base = 1024 if suffix == "IB" else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


# ----------------------------------------------------------------------------- sources
@dataclass
class Source:
    """Tensors to export, one at a time, with the pruning masks and metadata that go with them."""

    tensors: Iterator[tuple[str, torch.Tensor]]
    config: dict
    # weight name -> keep mask: bool [out, in], or packed 1 bit per weight (uint8, see
    # compact.pack_bits) so that a 70B model's masks fit in memory
    masks: dict[str, torch.Tensor] | None
    meta: dict | None  # the pruning run's llmprune.json (recipe, layers, ...)
    copy_files: list[Path] = field(default_factory=list)  # tokenizer etc.
    nm: tuple[int, int] | None = None
    count: int | None = None  # how many tensors ``tensors`` yields (at most), when known
    # fused expert parameters (3-D) whose mask covers their expert slices stacked, [E * out, in]
    # (compact.stack_experts): name -> whether the parameter stores each expert as [in, out]
    stacked: dict[str, bool] = field(default_factory=dict)
    # masks of single experts of a fused parameter, ``<owner>.expert_linears.<param>.<e>.weight``
    # (as the pruning run names them; no tensor of the checkpoint has the name) -> the (out, in)
    # each covers; a dense export's masks file keeps them as they are
    expert_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)


def side_files(src: Path) -> list[Path]:
    """The files of checkpoint directory ``src`` that an output copies as they are: everything
    but the weights (any format), ``config.json`` and llmprune's own metadata (tokenizer,
    generation config, chat template, README, ...)."""
    return [p for p in sorted(src.iterdir()) if p.is_file() and not WEIGHT_FILE_RE.search(p.name)
            and p.name not in (META_FILE, MASKS_FILE, "config.json")]


def dir_source(src: Path) -> Source:
    """A checkpoint directory: dense (with or without llmprune metadata) or compact."""
    meta = read_meta(src)
    config = json.loads((src / "config.json").read_text())
    copy_files = side_files(src)
    if meta and meta.get("format") == COMPACT_FORMAT:
        masks: dict[str, torch.Tensor] = {}

        def tensors():
            for name, dense, keep in iter_compact(src):
                if keep is not None:
                    masks[name] = keep
                yield name, dense
        # masks fill in as tensors are read; the exporter looks a tensor's mask up after reading
        stacked = {name: info["transposed"] for name, info in meta["tensors"].items()
                   if "transposed" in info}
        return Source(tensors(), config, masks, meta.get("source_meta"), copy_files,
                      nm_of(meta.get("source_meta")), len(meta.get("tensors") or {}) or None,
                      stacked)
    masks = read_masks(src)
    if meta is not None and masks is None:
        log.warning("%s has llmprune.json but no %s (made by an older llmprune?); pass --pattern "
                    "to derive the masks from the zeros", src, MASKS_FILE)
    stacked, expert_shapes = {}, {}
    files = SafetensorsFiles(checkpoint_files(src))
    if masks:
        masks, stacked, expert_shapes = with_fused_masks(src, masks)
        stacked = {n: t for n, t in stacked.items() if n in files.entries}
    return Source(iter(files), config, masks, meta, copy_files, nm_of(meta), len(files.entries),
                  stacked, expert_shapes)


def check_model_keys(src: Path) -> None:
    """That every tensor of dense checkpoint ``src`` is one its model holds as it is (or under
    another name): a compact export stores the checkpoint's tensors, and the compact loader
    cannot undo what transformers converts on load (e.g. Mixtral's experts saved one by one,
    fused into 3-D parameters when loaded). UserError otherwise."""
    from .loading import load_config, model_key, skeleton

    key = model_key(skeleton(load_config(str(src))),
                    remedy="a compact export holds the model's own tensors: prune with "
                           "--export compact, which writes the fused experts, or export "
                           "--format dense")
    for name in SafetensorsFiles(checkpoint_files(src)).entries:
        key(name)


def with_fused_masks(src: Path, masks: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, tuple]]:
    """A dense checkpoint's masks (weight name -> packed keep bits) plus, for each fused expert
    parameter whose experts the masks name one by one (``<owner>.expert_linears.<param>.<e>``,
    as the pruning run names them), that parameter's stacked mask; and the stacked parameters
    (:attr:`Source.stacked`); and the single experts' masks' shapes (:attr:`Source.expert_shapes`).
    Which way the parameter stores its experts is read from the model's weightless skeleton,
    built only when the masks name experts."""
    from ..models.experts import expert_of, fused_masks
    from .loading import load_config, skeleton

    modules = {n.removesuffix(".weight"): bits for n, bits in masks.items()}
    if not any(expert_of(n) for n in modules):
        return masks, {}, {}
    model = skeleton(load_config(str(src)))
    fused = fused_masks(model, modules)
    return {**masks, **{n: f.bits for n, f in fused.items()}}, \
        {n: f.transposed for n, f in fused.items()}, expert_mask_shapes(model, modules)


def expert_mask_shapes(model, masks: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Weight name -> (out, in) of each single expert that ``masks`` (by module name) name and
    ``model`` has (:attr:`Source.expert_shapes`)."""
    from ..models.experts import expert_weight

    weights = {n: expert_weight(model, n) for n in masks}
    return {f"{n}.weight": tuple(w.shape) for n, w in weights.items() if w is not None}


def model_source(model, masks: dict[str, torch.Tensor] | None, meta: dict | None,
                 tokenizer_dir: Path | None = None) -> Source:
    """An in-memory model (``--export compact`` straight after pruning). ``masks`` are packed
    keep bits by module name, as :class:`llmprune.calibrate.Report` holds them; the masks of
    the experts of a fused expert parameter become that parameter's (stacked) mask."""
    from ..models.experts import fused_masks

    keep, stacked, expert_shapes = None, {}, {}
    if masks is not None:
        fused = fused_masks(model, masks)
        keep = {f"{name}.weight": bits for name, bits in masks.items()}
        keep.update({name: f.bits for name, f in fused.items()})
        stacked = {name: f.transposed for name, f in fused.items()}
        expert_shapes = expert_mask_shapes(model, masks)

    state = model.state_dict()

    def tensors():
        seen: set[int] = set()
        for name, t in state.items():
            if t.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) are saved once
                continue
            seen.add(t.data_ptr())
            yield name, t.detach()
    copy_files = []
    if tokenizer_dir is not None:
        copy_files = [p for p in sorted(tokenizer_dir.iterdir()) if p.is_file()]
    return Source(tensors(), model.config.to_dict(), keep, meta, copy_files, nm_of(meta),
                  len(state), stacked, expert_shapes)


def pattern_masks(src: Path, config: dict, pattern: str) -> tuple[dict, tuple[int, int] | None]:
    """For a checkpoint without llmprune masks: keep masks from the nonzeros of every decoder
    linear, verified against ``pattern`` (``unstructured`` or ``N:M``) before anything is written."""
    from transformers import AutoConfig

    from .loading import skeleton
    from ..models import adapter_for

    target = Sparsity.parse(None if ":" in pattern else 0.0, pattern)
    nm = (target.n, target.m) if target.kind == "nm" else None
    skel = skeleton(AutoConfig.from_pretrained(src))
    adapter = adapter_for(skel)
    names = {f"{adapter.layers_path}.{i}.{lin}.weight"
             for i, layer in enumerate(adapter.layers(skel)) for lin in adapter.linears(layer)}
    masks = {}
    for name, weight in iter_safetensors(checkpoint_files(src)):
        if name not in names:
            continue
        keep = weight != 0
        del weight
        if nm and not compact.nm_fits(keep, *nm):
            groups = keep.view(keep.shape[0], -1, nm[1]).sum(-1) if keep.shape[1] % nm[1] == 0 \
                else None
            where = "" if groups is None else " (row {}, group {} keeps {})".format(
                *[int(v) for v in (groups > nm[0]).nonzero()[0]],
                int(groups[tuple((groups > nm[0]).nonzero()[0])]))
            raise UserError(f"{name} is not {pattern}{where}; the checkpoint does not have that "
                            "pattern: pass the pattern it was pruned with, or 'unstructured'")
        masks[name] = compact.pack_bits(keep)
    if len(masks) != len(names):
        raise UserError(f"{src} lacks {len(names) - len(masks)} decoder linear weights; is it a "
                        "complete checkpoint?")
    return masks, nm


def _raw(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _ShardWriter:
    """Writes encoded tensors into safetensors shards as they come, tensor by tensor, so memory
    holds one encoded tensor rather than a shard.

    Each tensor's bytes are written with ``pwrite`` and hashed (:data:`llmprune.io.checksums.TENSOR_CHECKSUM`, xxh3:
    ~30 GB/s, a few ms for a small model) on the calling thread. An earlier version wrote and
    hashed on a second thread to overlap encoding: on 2 cores that made the export of
    smollm2-135m 2x slower (0.60 vs 0.31 s, fresh processes), because every write that returned
    waited for the GIL held by the encoder's numpy calls (eval/bench_export.py).
    A shard's data go after room reserved for its header (the safetensors format lets a header
    end in spaces); the header is written into that room once the shard is complete or, should
    it not fit, the shard is rewritten once with the header in front."""

    def __init__(self, out: Path, prefix: str, max_bytes: int, header: dict,
                 expected: int | None = None, on_shard_written=None):
        self.out, self.prefix, self.max_bytes, self.header = out, prefix, max_bytes, header
        self.on_shard_written = on_shard_written  # called with the shard count after each shard
        self.hashes: dict[str, str] = {}  # stored tensor name -> checksum
        self.files: list[Path] = []
        self.where: dict[str, int] = {}  # stored tensor name -> shard number
        self.tensor_shard: dict[str, int] = {}  # source tensor name -> shard number
        self.expected = expected  # source tensors still to come, when the source knows
        self.per_tensor = 1024  # header bytes reserved per tensor, until a shard has shown more
        self.most_tensors = None  # tensors in the fullest shard so far
        self.handle = None

    def _open(self) -> None:
        left = self.expected or 64
        if self.most_tensors is not None:
            left = min(left, 2 * self.most_tensors)
        self.reserve = 8 + -(-(4096 + self.per_tensor * max(left, 1)) // 8) * 8
        self.path = self.out / f".shard-{len(self.files) + 1}.part"
        self.handle = open(self.path, "wb")
        self.entries: dict[str, dict] = {}
        self.meta: dict[str, dict] = {}
        self.data_bytes = 0

    @staticmethod
    def _put(fd: int, offset: int, t: torch.Tensor) -> str:
        raw = _raw(t)
        done = 0
        while done < len(raw):
            done += os.pwrite(fd, raw[done:], offset + done)
        return checksum_bytes(raw)

    def add(self, name: str, enc: compact.Encoded, info: dict) -> None:
        if self.handle is not None and self.entries and \
                self.data_bytes + enc.nbytes > self.max_bytes:
            self.flush()
        if self.handle is None:
            self._open()
        for suffix, t in enc.parts.items():
            key = f"{name}.{suffix}" if suffix else name
            t = t.detach().contiguous()
            end = self.data_bytes + t.numel() * t.element_size()
            self.entries[key] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                                 "data_offsets": [self.data_bytes, end]}
            self.hashes[key] = self._put(self.handle.fileno(), self.reserve + self.data_bytes, t)
            self.where[key] = len(self.files)
            self.data_bytes = end
        self.meta[name] = info
        self.tensor_shard[name] = len(self.files)
        if self.expected is not None:  # a hint that proves short is dropped
            self.expected = self.expected - 1 or None

    def flush(self) -> None:
        if self.handle is None:
            return
        meta = dict(self.header)
        if self.meta and self.header.get("llmprune_format"):
            meta["llmprune_tensors"] = json.dumps(self.meta, separators=(",", ":"))
        head = json.dumps({"__metadata__": meta, **self.entries}, separators=(",", ":")).encode()
        room, need = self.reserve - 8, len(head)
        if len(head) <= room:
            head += b" " * (room - len(head))
            os.pwrite(self.handle.fileno(), len(head).to_bytes(8, "little") + head, 0)
            self.handle.close()
        else:  # the reserved room is too small: rewrite the shard once, header first
            self.handle.close()
            head += b" " * (-(8 + len(head)) % 8)  # keep the data 8-byte aligned
            tmp = self.path.with_suffix(".part2")
            with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                dst.write(len(head).to_bytes(8, "little") + head)
                src.seek(self.reserve)
                shutil.copyfileobj(src, dst, 1 << 24)
            os.replace(tmp, self.path)
        self.per_tensor = max(self.per_tensor, -(-need * 5 // (4 * max(len(self.meta), 1))))
        self.most_tensors = max(self.most_tensors or 0, len(self.meta))
        self.files.append(self.path)
        self.handle = None
        if self.on_shard_written is not None:
            self.on_shard_written(len(self.files))

    def close(self) -> None:
        """Close the open shard (on success and on error alike)."""
        if self.handle is not None:
            self.handle.close()

    def finish(self, single_name: str | None) -> list[str]:
        """Rename the shards to their final ``prefix-0000k-of-0000n.safetensors`` names."""
        self.flush()
        self.close()
        n = len(self.files)
        names = []
        for k, path in enumerate(self.files, 1):
            name = single_name if (n == 1 and single_name) else \
                f"{self.prefix}-{k:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out / name)
            names.append(name)
        return names


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
    writer = _ShardWriter(out_dir, "llmprune" if fmt == "compact" else "model",
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
            writer: _ShardWriter, t0: float, progress: bool) -> dict:
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
                                 for key in _stored_keys(name, info["encoding"])}

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


# ----------------------------------------------------------------------------- reading compact
_SUFFIXES = {"plain": [""], "bitmask": ["values", "bitmask", "row_offsets"],
             "nm": ["values", "indices"]}


def parts_problem(info: dict, parts: dict[str, torch.Tensor]) -> str | None:
    """How the stored parts of one compact tensor disagree with its llmprune.json entry ``info``
    in dtype (None when they agree): the values in the entry's dtype, the keep bits and N:M
    indices as uint8 bytes, the row offsets integers."""
    for suffix, t in parts.items():
        want = {"": info["dtype"], "values": info["dtype"], "bitmask": "uint8",
                "indices": "uint8"}.get(suffix)
        got = str(t.dtype).removeprefix("torch.")
        shown = f".{suffix}" if suffix else ""
        if want is not None and got != want:
            return f"{shown} is stored as {got}, expected {want}"
        if want is None and (t.is_floating_point() or t.dtype == torch.bool):
            return f"{shown} is stored as {got}, expected integers"
    return None


def _stored_keys(name: str, encoding: str) -> list[str]:
    return [f"{name}.{s}" if s else name for s in _SUFFIXES[encoding]]


def verify_shards(src: Path, meta: dict) -> None:
    """Cheap whole-file checks before decoding: every shard is there, has its recorded size and
    an intact header. The data itself is checked tensor by tensor as it is read."""
    for name, want in meta["shards"].items():
        path = src / name
        if not path.exists():
            raise CorruptCheckpointError(f"{path} is missing; the compact checkpoint is incomplete")
        if path.stat().st_size != want["bytes"]:
            raise CorruptCheckpointError(
                f"{path} is {path.stat().st_size} bytes, expected {want['bytes']}: the file is "
                "truncated or was replaced; re-export the checkpoint")
        if header_sha256(path)[0] != want["header_sha256"]:
            raise CorruptCheckpointError(
                f"{path} fails its header sha256 checksum: the file is corrupted; re-export the "
                "checkpoint")


def iter_compact_parts(src: Path, verify: bool = True
                       ) -> Iterator[tuple[str, dict, dict[str, torch.Tensor]]]:
    """Yield ``(name, info, parts)`` for every tensor of a compact export, as stored: ``info`` is
    its entry in ``llmprune.json`` (encoding, shape, n, m...), ``parts`` its encoded tensors by
    suffix (``""`` for plain), checksums verified unless ``verify=False``."""
    meta = read_meta(src)
    if not meta or meta.get("format") != COMPACT_FORMAT:
        raise UserError(f"{src} is not a compact llmprune checkpoint (no {META_FILE} with format "
                        f"{COMPACT_FORMAT})")
    algo = checksum_algo(meta)
    if verify:
        hasher(algo)  # an unknown algorithm fails here, before any decoding
        verify_shards(src, meta)
    by_shard: dict[str, list[str]] = {}
    for name, info in meta["tensors"].items():
        by_shard.setdefault(info["shard"], []).append(name)
    for shard, names in by_shard.items():
        path = src / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    info = meta["tensors"][name]
                    parts = {s: f.get_tensor(f"{name}.{s}" if s else name)
                             for s in _SUFFIXES[info["encoding"]]}
                    problem = parts_problem(info, parts)
                    if problem:
                        raise CorruptCheckpointError(f"{path}: tensor {name}{problem}; the file "
                                                     "does not match llmprune.json, re-export "
                                                     "the checkpoint")
                    if verify:
                        for s_, t_ in parts.items():
                            if tensor_checksum(t_, algo) != info[algo][s_]:
                                raise CorruptCheckpointError(
                                    f"{path} fails the {algo} checksum of tensor "
                                    f"{name}{'.' + s_ if s_ else ''}: the file is corrupted; "
                                    "re-export the checkpoint")
                    yield name, info, parts
        except CorruptCheckpointError:
            raise
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"cannot decode {path}: {exc}; the file is damaged, "
                                         "re-export the checkpoint") from None


def decode_parts(name: str, info: dict, parts: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One tensor of :func:`iter_compact_parts` -> ``(dense tensor, keep mask or None)``. A
    fused expert parameter stored stacked (``transposed`` in ``info``) decodes to its 3-D shape;
    its keep mask covers its experts stacked, bool ``[E * out, in]``."""
    shape = tuple(info["shape"])
    transposed = info.get("transposed")
    flat_shape = shape if transposed is None else compact.stacked_shape(shape, transposed)
    try:
        if transposed is None:
            dense = flat = compact.decode(info["encoding"], parts, shape, info.get("n"),
                                          info.get("m"))
        elif info["encoding"] == "plain":  # stored as it is (too dense to compact)
            dense = parts[""]
            flat = compact.stack_experts(dense, transposed)
        else:
            flat = compact.decode(info["encoding"], parts, flat_shape, info.get("n"),
                                  info.get("m"))
            dense = compact.unstack_experts(flat, shape, transposed)
    except (ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"cannot decode tensor {name}: {exc}; the file is damaged, "
                                     "re-export the checkpoint") from None
    keep = None
    if info["encoding"] == "bitmask":
        keep = compact.unpack_bits(parts["bitmask"], flat_shape[1])
    elif info["encoding"] == "nm":
        keep = compact.nm_keep(parts["indices"], flat_shape, info["n"], info["m"])
    elif info["pattern"] != "dense":
        keep = flat != 0  # stored plain (too dense to compact): zeros = pruned
    return dense, keep


def iter_compact(src: Path, verify: bool = True
                 ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Yield ``(name, dense tensor, keep mask or None)`` for every tensor of a compact export."""
    for name, info, parts in iter_compact_parts(src, verify):
        yield (name, *decode_parts(name, info, parts))


# ----------------------------------------------------------------------------- entry point
# export() under a name that write_checkpoint's parameter `export` does not shadow
write_export = export


def mask_shape(model, name: str) -> tuple[int, int]:
    """``(out, in)`` of the matrix that the mask of module ``name`` covers: an ``nn.Linear``'s
    weight, or one expert of a fused expert parameter (``<owner>.expert_linears.<param>.<e>``)."""
    from ..models.experts import expert_weight

    w = expert_weight(model, name)
    return tuple((w if w is not None else model.get_submodule(name).weight).shape)


def write_checkpoint(model, tokenizer, out_dir: Path, meta: dict, masks: dict | None = None,
                     export: str = "dense", dtype: str = "auto", progress: bool = True) -> None:
    """Save the pruned model into ``out_dir``: a dense checkpoint (zeros in place) with the pruning
    masks and ``llmprune.json``, or a compact export (``export="compact"``)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if export == "compact" or dtype != "auto":
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
        write_export(model_source(model, masks, meta), out_dir, export, dtype, progress=progress)
        return
    model.save_pretrained(out_dir)
    if masks:
        write_masks(out_dir, {f"{n}.weight": b for n, b in masks.items()},
                    {f"{n}.weight": mask_shape(model, n) for n in masks})
    write_meta(out_dir, meta)


def export_checkpoint(src: str, output: str, fmt: str = "compact", dtype: str = "auto",
                      pattern: str | None = None, max_shard_size: str | int = "5GB",
                      overwrite: bool = False, progress: bool = True,
                      on_shard_written: Callable[[int], None] | None = None) -> dict:
    """``llmprune export``: checkpoint directory ``src`` -> ``output`` (written atomically).
    ``on_shard_written``: see :func:`export`."""
    from .loading import resolve
    from .output import atomic_dir, check_output

    check_export_args(fmt, dtype)
    parse_size(max_shard_size)
    out = check_output(output, overwrite)
    resolved = resolve(src)
    if not Path(resolved).is_dir():
        raise UserError(f"llmprune export reads a local checkpoint directory; {src!r} is not one")
    src_path = Path(resolved)
    check_output(output, overwrite, sources=(str(src_path),))
    source = dir_source(src_path)
    if pattern is not None:
        if source.masks is not None or is_compact(src_path):
            recorded = (source.meta or {}).get("target")
            raise UserError(f"{src} carries its pruning masks (pattern {recorded}); drop "
                            "--pattern, which is only for checkpoints without llmprune metadata")
        source.masks, source.nm = pattern_masks(src_path, source.config, pattern)
    elif source.masks is None and fmt == "compact":
        raise UserError(f"{src} has no llmprune pruning masks ({MASKS_FILE}); pass --pattern "
                        "unstructured or --pattern N:M to take them from the checkpoint's zeros "
                        "(they are verified first)")
    if fmt == "compact" and not is_compact(src_path):
        check_model_keys(src_path)
    with atomic_dir(out, overwrite) as tmp:
        meta = export(source, tmp, fmt, dtype, max_shard_size, progress, on_shard_written)
    return meta
