"""``llmprune inspect DIR``: what a checkpoint holds, per tensor, and whether N:M really is N:M.

Works on compact exports (bytes on disk are the encoded bytes) and on dense checkpoints (bytes are
the plain tensor bytes; patterns come from llmprune.json when the checkpoint has one). Every
tensor is decoded and counted, not taken on trust from the metadata: a tensor that claims N:M is
checked group by group.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import UserError
from .compact import stack_experts
from .compact_reader import iter_compact
from .meta import is_compact, nm_of, read_masks, read_meta
from .safetensors import checkpoint_files, iter_safetensors


@dataclass
class Row:
    name: str
    shape: tuple[int, ...]
    pattern: str
    encoding: str
    sparsity: float  # fraction of exact zeros
    nbytes: int
    dense_nbytes: int
    violations: int = 0  # groups of M holding more than N nonzeros


def _nm_violations(t: torch.Tensor, n: int, m: int) -> int:
    if t.dim() != 2 or t.shape[1] % m:
        return t.numel()
    return int(((t != 0).view(t.shape[0], -1, m).sum(-1) > n).sum())


def inspect_checkpoint(path: str | Path) -> tuple[list[Row], dict]:
    src = Path(path).expanduser()
    if not (src / "config.json").exists():
        raise UserError(f"{path} is not a checkpoint directory (no config.json)")
    meta = read_meta(src) or {}
    rows: list[Row] = []
    if is_compact(src):
        nm = nm_of(meta.get("source_meta"))
        for name, dense, _ in iter_compact(src):
            info = meta["tensors"][name]
            pattern = info["pattern"]
            if "transposed" in info:  # fused experts: N:M along each expert's inputs
                dense = stack_experts(dense, info["transposed"])
            viol = 0
            if ":" in pattern:
                n, m = (int(v) for v in pattern.split(":"))
                viol = _nm_violations(dense, n, m)
            elif nm and info["encoding"] == "nm":
                viol = _nm_violations(dense, info["n"], info["m"])
            rows.append(Row(name, tuple(info["shape"]), pattern, info["encoding"],
                            float((dense == 0).sum()) / max(dense.numel(), 1), info["bytes"],
                            info["dense_bytes"], viol))
    else:
        masks = read_masks(src) or {}
        nm = nm_of(meta)
        for name, t in iter_safetensors(checkpoint_files(src)):
            pruned = name in masks
            pattern = "dense"
            viol = 0
            if pruned:
                pattern = f"{nm[0]}:{nm[1]}" if nm else "unstructured"
                if nm:
                    viol = _nm_violations(t, *nm)
            nbytes = t.numel() * t.element_size()
            rows.append(Row(name, tuple(t.shape), pattern, "plain",
                            float((t == 0).sum()) / max(t.numel(), 1), nbytes, nbytes, viol))
    files = [p for p in src.iterdir() if p.is_file() and p.suffix == ".safetensors"]
    totals = {
        "format": meta.get("format", "transformers (no llmprune.json)"),
        "tensor_bytes": sum(r.nbytes for r in rows),
        "dense_tensor_bytes": sum(r.dense_nbytes for r in rows),
        "files_bytes": sum(p.stat().st_size for p in files),
        "pruned_tensors": sum(r.pattern != "dense" for r in rows),
        "nm_violations": sum(r.violations for r in rows),
    }
    pruned = [r for r in rows if r.pattern != "dense"]
    numel = sum(_numel(r.shape) for r in pruned)
    totals["pruned_sparsity"] = (sum(r.sparsity * _numel(r.shape) for r in pruned) / numel
                                 if numel else 0.0)
    return rows, totals


def _numel(shape) -> int:
    return math.prod(shape)


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def format_table(rows: list[Row], totals: dict) -> str:
    head = f"{'tensor':<48} {'shape':>14} {'pattern':>12} {'encoding':>8} {'sparsity':>8} " \
           f"{'MiB':>8} {'dense MiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        flag = f"  NOT {r.pattern} ({r.violations} groups)" if r.violations else ""
        lines.append(f"{r.name:<48} {shape:>14} {r.pattern:>12} {r.encoding:>8} "
                     f"{r.sparsity:>8.4f} {_mib(r.nbytes):>8} {_mib(r.dense_nbytes):>9}{flag}")
    ratio = totals["tensor_bytes"] / max(totals["dense_tensor_bytes"], 1)
    lines += ["-" * len(head),
              f"format: {totals['format']}",
              f"pruned tensors: {totals['pruned_tensors']}, sparsity over them: "
              f"{totals['pruned_sparsity']:.4f}",
              f"tensor bytes: {_mib(totals['tensor_bytes'])} MiB vs dense "
              f"{_mib(totals['dense_tensor_bytes'])} MiB ({ratio:.4f}x); safetensors files on "
              f"disk: {_mib(totals['files_bytes'])} MiB"]
    if totals["nm_violations"]:
        lines.append(f"FAILED: {totals['nm_violations']} groups break their N:M pattern")
    else:
        lines.append("N:M check: ok")
    return "\n".join(lines)


def to_json(rows: list[Row], totals: dict) -> str:
    return json.dumps({"tensors": [r.__dict__ for r in rows], "totals": totals}, indent=2)
