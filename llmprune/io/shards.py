"""Safetensors shards written as the tensors come: :class:`ShardWriter`, and the shard size
limit (:func:`parse_size`)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..core.errors import UserError
from . import compact
from .checksums import checksum_bytes
from .safetensors import ST_NAMES


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

def _raw(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
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

