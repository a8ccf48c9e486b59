"""Checksums of an export's tensors (xxh3-128 from format version 2, sha256 before) and of its
shards' headers. They guard against damaged files, not against tampering."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..core.errors import CorruptCheckpointError
from .meta import META_FILE

# the checksum new exports store per tensor; read at call time
TENSOR_CHECKSUM = "xxh3_128"


def hasher(algo: str):
    if algo == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128
    if algo == "sha256":
        return hashlib.sha256
    raise CorruptCheckpointError(f"unknown tensor checksum {algo!r} in {META_FILE}: the file is "
                                 "damaged or from a newer llmprune; upgrade llmprune")


def checksum_bytes(raw, algo: str | None = None) -> str:
    """``algo`` (default :data:`TENSOR_CHECKSUM`, read at call time) of ``raw``, as hex."""
    return hasher(algo or TENSOR_CHECKSUM)(raw).hexdigest()


def tensor_checksum(t: torch.Tensor, algo: str | None = None) -> str:
    """Checksum (``algo``: xxh3_128 or sha256) of a tensor's raw bytes (no copy for contiguous
    CPU tensors)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return checksum_bytes(memoryview(raw), algo)


def checksum_algo(meta: dict) -> str:
    """The per-tensor checksum of an export's ``llmprune.json`` (sha256 before version 2)."""
    return meta.get("tensor_checksum", "sha256")


def header_sha256(path: Path) -> tuple[str, int]:
    """sha256 and length of a safetensors file's header (8-byte length + JSON)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path} is truncated (no safetensors header)")
        n = int.from_bytes(head, "little")
        body = f.read(min(n, 1 << 30))
    return hashlib.sha256(head + body).hexdigest(), n
