"""``llmprune.json`` and ``llmprune_masks.safetensors``: the metadata of every llmprune output.

``llmprune.json`` has one writer (:func:`write_meta`) and one reader (:func:`read_meta`), both
of which validate it: a JSON object whose ``format`` says which kind of output the directory
holds (:data:`FORMATS`). The masks file holds each pruned weight's keep bits (``True`` = kept),
packed 8 per byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.errors import CorruptCheckpointError, UserError
from .output import write_text_atomic

META_FILE = "llmprune.json"
MASKS_FILE = "llmprune_masks.safetensors"

# 2: per-tensor checksums are xxh3-128 (1: sha256; the reader takes both). The checksums guard
# against damaged files, not against tampering; xxh3 hashes at memory speed (~10 GB/s here),
# sha256 at 1.4 GB/s, which made it a third of the export's time (eval/bench_export.py).
# 3: fused expert parameters (3-D) may be stored encoded, as their expert slices stacked into one
# 2-D matrix (io.compact.stack_experts), their entry saying how (``transposed``). An export with
# no such tensor is still written as version 2, which llmprune before version 3 reads.
FORMAT_VERSION = 3  # the newest compact format this llmprune reads
STACKED_EXPERTS_VERSION = 3
COMPACT_FORMAT = "llmprune-compact"  # compact shards (io.export), loaded by llmprune
DENSE_FORMAT = "llmprune-dense"  # a plain transformers checkpoint with pruning metadata
STRUCTURED_FORMAT = "llmprune-structured"  # structured.format: shrunk layers
FORMATS = (COMPACT_FORMAT, DENSE_FORMAT, STRUCTURED_FORMAT)


def json_text(obj, levels: int = 2, _level: int = 0) -> str:
    """``obj`` as JSON, dicts indented for the first ``levels`` levels (one line per tensor in
    ``llmprune.json``'s ``tensors``) and compact below. ``json.dumps(indent=2)`` of a whole
    export's metadata runs Python's pure-Python encoder and took ~25 ms of a ~0.2 s smollm2
    export; this formats the deep part with the C encoder."""
    if isinstance(obj, dict) and obj and _level < levels:
        pad = "  " * (_level + 1)
        items = [f"{pad}{json.dumps(str(k))}: {json_text(v, levels, _level + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * _level + "}"
    return json.dumps(obj, default=str)


def write_masks(out_dir: Path, masks: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> None:
    """``masks``: weight name -> packed keep bits (:func:`compact.pack_bits`)."""
    meta = {"format": "pt", "llmprune_masks": "keep bits, little-endian, rows byte-padded",
            "shapes": json.dumps({k: list(v) for k, v in shapes.items()})}
    save_file({k: v.contiguous() for k, v in masks.items()}, str(out_dir / MASKS_FILE), meta)


def read_masks(src: Path) -> dict[str, torch.Tensor] | None:
    """Weight name -> packed keep bits, or None when ``src`` has no masks file."""
    path = src / MASKS_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            json.loads(f.metadata()["shapes"])
            masks = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, KeyError, ValueError, OSError) as exc:
        raise CorruptCheckpointError(f"cannot read {path}: {exc}; the masks file is damaged, "
                                     "re-run the pruning") from None
    for name, bits in masks.items():
        if bits.dtype != torch.uint8:
            raise CorruptCheckpointError(f"{path}: mask {name} is stored as "
                                         f"{str(bits.dtype).removeprefix('torch.')}, expected "
                                         "uint8 keep bits; the masks file is damaged, re-run "
                                         "the pruning")
    return masks


def write_meta(directory: Path, meta: dict, durable: bool = False) -> None:
    """Write ``directory/llmprune.json``: the one writer of the file. Atomic (a temporary
    sibling renamed over it), and with ``durable`` flushed to disk with the directory entry
    before returning (the streaming engine writes it last, to mark an output complete)."""
    check_meta(meta, directory / META_FILE)
    write_text_atomic(directory / META_FILE, json_text(meta) + "\n", durable=durable)


def check_meta(meta, where: Path) -> dict:
    """``meta`` if it is a valid llmprune.json: a JSON object whose ``format`` is one of
    :data:`FORMATS` and whose ``format_version``, when present, is a positive integer;
    CorruptCheckpointError otherwise. A compact export of a newer format version than
    :data:`FORMAT_VERSION` is refused (UserError: upgrade) before its fields are checked."""
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{where} is not a JSON object; the file is damaged")
    fmt = meta.get("format")
    if fmt not in FORMATS:
        raise CorruptCheckpointError(f"{where} has format {fmt!r}, expected one of "
                                     f"{', '.join(FORMATS)}; the file is damaged")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpointError(f"{where} has format_version {version!r}; the file is "
                                     "damaged")
    if fmt == COMPACT_FORMAT and version > FORMAT_VERSION:  # before its fields are checked
        raise UserError(f"{where.parent} uses compact format version {version}; this llmprune "
                        f"reads up to {FORMAT_VERSION}: upgrade llmprune")
    if fmt == COMPACT_FORMAT:
        problem = compact_meta_problem(meta)
        if problem:
            raise CorruptCheckpointError(f"{where}: {problem}; the file was edited or damaged: "
                                         "restore it from the export or export again")
    return meta


# dtypes a compact export stores its weights in (``dtype``), and any tensor's dtype
STORED_DTYPES = ("float32", "float16", "bfloat16", "float64")
TENSOR_DTYPES = (*STORED_DTYPES, "int64", "int32", "int16", "int8", "uint8", "bool")


def _is_count(v) -> bool:
    return type(v) is int and v >= 0


def compact_meta_problem(meta: dict) -> str | None:
    """What is wrong with a compact export's ``llmprune.json`` beyond its format (None when
    nothing is): ``dtype`` one of :data:`STORED_DTYPES` and that of its first floating point
    tensor (the exporter records it so); ``shards`` and ``tensors`` objects; each tensor with a
    known encoding, a shape of non-negative integers (2-D when encoded, or 3-D for fused experts
    whose entry has a boolean ``transposed``, since format version 3), a dtype of
    :data:`TENSOR_DTYPES`, one of the listed shards, and N:M counts for ``nm`` (that divide the
    inputs of every row: the 2-D shape's second dimension, an expert's for 3-D)."""
    from .compact import ENCODINGS

    dtype, shards, tensors = meta.get("dtype"), meta.get("shards"), meta.get("tensors")
    if dtype not in STORED_DTYPES:
        return f"dtype {dtype!r} is not one of {', '.join(STORED_DTYPES)}"
    if not isinstance(shards, dict) or not isinstance(tensors, dict):
        return "'shards' and 'tensors' must be JSON objects"
    first_float = None
    for name, info in tensors.items():
        if not isinstance(info, dict):
            return f"tensor {name} has no description"
        shape, enc = info.get("shape"), info.get("encoding")
        if enc not in ENCODINGS:
            return f"tensor {name} has encoding {enc!r}, expected one of {', '.join(ENCODINGS)}"
        stacked = info.get("transposed")
        if stacked is not None and (not isinstance(stacked, bool)
                                    or meta.get("format_version", 1) < STACKED_EXPERTS_VERSION):
            return f"tensor {name} has transposed {stacked!r}"
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape) or (
                stacked is not None and len(shape) != 3) or (
                stacked is None and enc != "plain" and len(shape) != 2):
            return f"tensor {name} has shape {shape!r}"
        if info.get("dtype") not in TENSOR_DTYPES:
            return f"tensor {name} has dtype {info.get('dtype')!r}"
        if info.get("shard") not in shards:
            return f"tensor {name} is in shard {info.get('shard')!r}, which is not listed"
        # an N:M row's inputs: [out, in], [E, out, in], or [E, in, out] (transposed)
        if enc == "nm" and not (_is_count(info.get("n")) and _is_count(info.get("m"))
                                and 0 < info["n"] <= info["m"]
                                and (shape[1] if stacked else shape[-1]) % info["m"] == 0):
            return f"tensor {name} has N:M {info.get('n')!r}:{info.get('m')!r}"
        if first_float is None and info["dtype"] in STORED_DTYPES:
            first_float = info["dtype"]
    if first_float is not None and first_float != dtype:
        return f"dtype is {dtype!r} but the weights are stored as {first_float!r}"
    return None


def read_meta(src: Path) -> dict | None:
    """The validated ``src/llmprune.json`` (see :func:`check_meta`), or None when ``src`` has
    none (a plain transformers checkpoint)."""
    path = src / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise CorruptCheckpointError(f"cannot read {path}: {exc}") from None
    return check_meta(meta, path)


def is_compact(src: str | Path) -> bool:
    meta = read_meta(Path(src)) if Path(src).is_dir() else None
    return bool(meta) and meta.get("format") == COMPACT_FORMAT


def nm_of(meta: dict | None) -> tuple[int, int] | None:
    if not meta:
        return None
    target = meta.get("target") or ""
    if ":" in target:
        n, m = target.split(":")
        return int(n), int(m)
    return None
