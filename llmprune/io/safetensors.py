"""Safetensors files read one tensor at a time (:class:`SafetensorsFiles`, ``readinto`` at the
recorded offsets, so a shard is never resident whole) and written durably
(:func:`write_safetensors`)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ..core.errors import CorruptCheckpointError, UserError
from ..core.finite import check_finite
from .meta import META_FILE
from .output import fsync_dir

log = logging.getLogger(__name__)


WEIGHT_FILE_RE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.gguf|\.index\.json)$")


def checkpoint_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [src / f for f in dict.fromkeys(weight_map.values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptCheckpointError(f"cannot read {index}: {type(exc).__name__} {exc}; "
                                         "the index is damaged, replace it") from None
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CorruptCheckpointError(f"{index} lists {missing[0].name}, which is missing "
                                         f"from {src}; the checkpoint is incomplete")
        return files
    single = src / "model.safetensors"
    if single.exists():
        return [single]
    raise UserError(f"{src} has no model.safetensors; llmprune export reads safetensors "
                    "checkpoints only (never pickle): convert it with save_pretrained first")


def check_checkpoint(src: Path) -> None:
    """Before transformers reads local checkpoint ``src``: every safetensors file it names has a
    sound header that fits the file (:func:`check_header`), and compact shards come with their
    ``llmprune.json``; a one-line CorruptCheckpointError naming the file otherwise. A directory
    without safetensors files (pickle weights) is left to transformers."""
    if not (src / META_FILE).exists() and any(src.glob("llmprune-*-of-*.safetensors")):
        raise CorruptCheckpointError(f"{src} holds compact llmprune shards but no {META_FILE}; "
                                     f"restore {META_FILE} from the export (it describes how to "
                                     "decode them) or export the checkpoint again")
    if (src / "model.safetensors.index.json").exists() or (src / "model.safetensors").exists():
        SafetensorsFiles(checkpoint_files(src))


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def check_header(header, data_bytes: int) -> dict:
    """The tensor entries of a parsed safetensors header (``__metadata__`` dropped), each with a
    known dtype, a shape of non-negative integers and data offsets inside the file's
    ``data_bytes`` that span exactly the shape's bytes; ValueError naming the first bad entry."""
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in ST_DTYPES:
            raise ValueError(f"tensor {name} has no known dtype in its header entry")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(
                type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name} has shape {shape!r} in its header entry")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise ValueError(f"tensor {name} has data offsets {offsets!r} outside the file's "
                             f"{data_bytes} data bytes (truncated?)")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * ST_DTYPES[info["dtype"]].itemsize:
            raise ValueError(f"tensor {name}: its data offsets {offsets} do not span its "
                             f"{info['dtype']} shape {shape}")
        out[name] = info
    return out


class SafetensorsFiles:
    """The tensors of safetensors files, one at a time, in file order or by name.

    Tensors are read with plain ``readinto`` rather than mmap: a mapped source would count its
    every touched page in our resident memory, so exporting a 70B checkpoint would look like
    (and, under pressure, act like) holding it all. Headers are read up front, so a damaged
    header fails before any output is written."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, dict, int]] = {}  # name -> (file, info, data start)
        for path in files:
            try:
                size = path.stat().st_size
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    if size < 8 or n > size - 8:
                        raise ValueError(f"its header length {n} exceeds the file's {size} "
                                         "bytes (truncated?)")
                    header = json.loads(f.read(n))
                header = check_header(header, size - 8 - n)
            except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
                raise CorruptCheckpointError(f"cannot read {path}: {exc}; the file is damaged "
                                             "or truncated, replace it") from None
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                self.entries[key] = (path, info, 8 + n)

    def rename(self, names: dict[str, str]) -> None:
        """Serve the tensors named by the keys of ``names`` under their values instead."""
        self.entries = {names.get(k, k): v for k, v in self.entries.items()}

    def float_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its weights in: that of its first float32, bfloat16
        or float16 tensor (float32 when it has none)."""
        for _, info, _ in self.entries.values():
            if info["dtype"] in ("F32", "BF16", "F16"):
                return ST_DTYPES[info["dtype"]]
        return torch.float32

    def shape(self, name: str) -> list[int]:
        return self.entries[name][1]["shape"]

    def _read(self, f, name: str) -> torch.Tensor:
        import numpy as np

        path, info, base = self.entries[name]
        start, end = info["data_offsets"]
        try:
            buf = np.empty(end - start, np.uint8)
            f.seek(base + start)
            if f.readinto(memoryview(buf)) != end - start:
                raise OSError(f"tensor {name} is truncated")
            return torch.from_numpy(buf).view(ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"cannot read {path}: {exc}") from None

    def read(self, name: str) -> torch.Tensor:
        with open(self.entries[name][0], "rb") as f:
            return self._read(f, name)

    def map(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped copy-on-write: only the pages that are touched become
        resident (an embedding lookup of a few hundred tokens touches as many rows, and a
        tensor that is never used costs nothing). Data not aligned to its element size is
        read instead."""
        import numpy as np

        path, info, base = self.entries[name]
        start, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        if end == start or (base + start) % dtype.itemsize:
            return self.read(name)
        try:
            arr = np.memmap(path, dtype=np.uint8, mode="c", offset=base + start,
                            shape=(end - start,))
        except (OSError, ValueError) as exc:
            raise CorruptCheckpointError(f"cannot read {path}: {exc}") from None
        return torch.from_numpy(arr).view(dtype).reshape(info["shape"])

    COPY_CHUNK = 16 << 20

    def check_finite(self, name: str) -> None:
        """:func:`llmprune.core.finite.check_finite` of tensor ``name``, read ``COPY_CHUNK``
        bytes at a time (an embedding matrix is checked without becoming resident)."""
        import numpy as np

        path, info, base = self.entries[name]
        dtype = ST_DTYPES[info["dtype"]]
        if not dtype.is_floating_point:
            return
        start, end = info["data_offsets"]
        with open(path, "rb") as f:
            for offset in range(start, end, self.COPY_CHUNK):
                buf = np.empty(min(self.COPY_CHUNK, end - offset), np.uint8)
                f.seek(base + offset)
                if f.readinto(memoryview(buf)) != len(buf):
                    raise CorruptCheckpointError(f"cannot read {path}: tensor {name} is "
                                                 "truncated")
                check_finite(name, torch.from_numpy(buf).view(dtype), path)

    def copy_bytes(self, name: str, out) -> int:
        """Write tensor ``name``'s stored bytes to the binary file ``out`` through a
        ``COPY_CHUNK`` buffer: no tensor and no mapping, so a tensor of any size costs 16 MB."""
        path, info, base = self.entries[name]
        start, end = info["data_offsets"]
        buf = bytearray(min(self.COPY_CHUNK, max(end - start, 1)))
        view = memoryview(buf)
        done = 0
        with open(path, "rb") as f:
            f.seek(base + start)
            while done < end - start:
                want = min(len(buf), end - start - done)
                got = f.readinto(view[:want])
                if not got:
                    raise CorruptCheckpointError(f"cannot read {path}: tensor {name} is "
                                                 "truncated")
                out.write(view[:got])
                done += got
        return done

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors, file by file in offset order, each file opened once."""
        handle = path = None
        try:
            for name, (file, _, _) in self.entries.items():
                if file != path:
                    if handle:
                        handle.close()
                    handle, path = open(file, "rb"), file
                yield name, self._read(handle, name)
        finally:
            if handle:
                handle.close()


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    return iter(SafetensorsFiles(files))


# ----------------------------------------------------------------------------- writer
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


# ----------------------------------------------------------------------------- durable files
def write_safetensors(path: Path, names: list[str], get, metadata: dict | None = None,
                      on_half_written=None, spec=None, copy_from=None) -> int:
    """Write tensors ``get(name)`` for ``names`` into safetensors file ``path`` one tensor at a
    time, through a temporary file that is fsynced and renamed (never half-written under its
    name). ``spec(name) -> (safetensors dtype, shape)`` gives the header without calling ``get``
    (for tensors read from disk); by default it is taken from ``get(name)``, which must then be
    cheap (resident tensors). ``copy_from`` (a :class:`SafetensorsFiles`) copies each tensor's
    stored bytes through a bounded buffer instead of calling ``get``. Returns the data bytes
    written."""
    if spec is None:
        def spec(name):
            t = get(name)
            return ST_NAMES[t.dtype], list(t.shape)
    specs = {}
    offset = 0
    for name in names:
        dtype, shape = spec(name)
        n = ST_DTYPES[dtype].itemsize
        for d in shape:
            n *= d
        specs[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = dict(specs)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k, name in enumerate(names):
            if copy_from is not None:
                start, end = specs[name]["data_offsets"]
                if copy_from.copy_bytes(name, f) != end - start:
                    raise ValueError(f"{name}: the tensor does not match its header entry")
                continue
            t = get(name).detach().contiguous()
            if t.numel() * t.element_size() != specs[name]["data_offsets"][1] - \
                    specs[name]["data_offsets"][0]:
                raise ValueError(f"{name}: the tensor does not match its header entry")
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
            if on_half_written is not None and k == len(names) // 2:
                f.flush()
                on_half_written()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return offset
