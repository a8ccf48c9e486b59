"""Reading a compact export (the layout is in :mod:`llmprune.io.export`): its tensors as
stored (:func:`iter_compact_parts`), each checked against ``llmprune.json``, and decoded back to
the dense pruned weights and their keep masks (:func:`decode_parts`, :func:`iter_compact`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.errors import CorruptCheckpointError, UserError
from . import compact
from .checksums import checksum_algo, hasher, header_sha256, tensor_checksum
from .meta import COMPACT_FORMAT, META_FILE, read_meta


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
                             for s in compact.PART_SUFFIXES[info["encoding"]]}
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

