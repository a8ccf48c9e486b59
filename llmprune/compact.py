"""Compact encodings of pruned weights: pure tensor functions, no I/O.

A pruned weight ``W [out, in]`` comes with a *keep* mask (``True`` = the weight survived pruning;
llmprune's masks are carried from the pruning run, never guessed from ``W == 0``). Three encodings:

``plain``
    ``W`` itself.

``bitmask`` (unstructured)
    * ``values``  ``[nnz]`` in the weight dtype: the kept weights in row-major order;
    * ``bitmask`` ``uint8 [out, ceil(in/8)]``: the keep mask, 1 bit per element, bit ``j % 8`` of
      byte ``j // 8`` of row ``r`` is element ``(r, j)`` (little-endian bit order). Each row is padded
      to a whole byte so rows decode independently;
    * ``row_offsets`` ``int32|int64 [out + 1]``: ``values[row_offsets[r]:row_offsets[r+1]]`` are
      row ``r``'s kept weights.

    Bytes: ``nnz * esize + out * ceil(in/8) + 4 (out + 1)``; at 50% in bf16 that is
    ``0.5625 x dense`` plus the row offsets.

``nm`` (N:M along the input dimension)
    * ``values``  ``[out, in * N / M]`` in the weight dtype: the N kept weights of every group of M,
      in ascending column order (the compressed operand of a 2:4 sparse GEMM);
    * ``indices`` ``uint8 [out, ceil(in * N / M * b / 8)]``: the position (``0 .. M-1``) of every
      value inside its group, ``b`` bits each (``b`` = 2 for M = 4, 4 for M <= 16, else 8), packed
      little-endian: value ``k`` of row ``r`` sits in bits ``b * (k % (8/b))`` of byte
      ``k // (8/b)``. For 2:4 one byte holds the four indices of two consecutive groups.

    A group with fewer than N kept weights is padded with (zero-valued) pruned positions, so
    every group has exactly N slots and indices stay strictly increasing inside a group.
    Bytes for 2:4 in bf16: ``out * in * (2/4 * 2 + 2/4 * 2/8) = 0.5625 x dense``.

Decoding is bit-exact: kept values are stored verbatim and pruned positions decode to ``+0.0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ENCODINGS = ("plain", "bitmask", "nm")

# A compact encoding is used only when it saves at least this fraction of the plain bytes: a
# nearly dense tensor is cheaper to keep plain than to decode.
MIN_SAVING = 0.10


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[out, in]`` -> uint8 ``[out, ceil(in/8)]``, little-endian bits, rows byte-padded."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 ``[out, ceil(width/8)]`` -> bool ``[out, width]``."""
    return torch.from_numpy(
        np.unpackbits(bits.cpu().numpy(), axis=-1, count=width, bitorder="little").astype(bool))


def index_bits(m: int) -> int:
    """Bits per N:M index: the smallest of 1, 2, 4, 8 that can hold 0 .. m-1."""
    need = max(1, math.ceil(math.log2(m)))
    for b in (1, 2, 4, 8):
        if need <= b:
            return b
    raise ValueError(f"N:M with M = {m} > 256 is not supported")


def _pack_fields(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[out, k]`` with values < 2**bits -> uint8 ``[out, ceil(k*bits/8)]``."""
    per_byte = 8 // bits
    out, k = idx.shape
    pad = (-k) % per_byte
    if pad:
        idx = torch.cat([idx, idx.new_zeros(out, pad)], dim=1)
    idx = idx.view(out, -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (idx << shifts).sum(-1).to(torch.uint8)


def _unpack_fields(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    fields = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)


@dataclass(frozen=True)
class Encoded:
    encoding: str  # plain | bitmask | nm
    parts: dict[str, torch.Tensor]  # suffix -> tensor ("" for plain)
    shape: tuple[int, ...]
    n: int | None = None
    m: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


# ----------------------------------------------------------------------------- sizes
def bitmask_nbytes(shape: tuple[int, int], nnz: int, esize: int) -> int:
    out, cols = shape
    return nnz * esize + out * ((cols + 7) // 8) + (out + 1) * (4 if nnz < 2**31 else 8)


def nm_nbytes(shape: tuple[int, int], n: int, m: int, esize: int) -> int:
    out, cols = shape
    k = cols // m * n
    return out * k * esize + out * math.ceil(k * index_bits(m) / 8)


def nm_fits(keep: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive inputs keeps at most ``n`` weights."""
    if keep.dim() != 2 or keep.shape[1] % m:
        return False
    return bool((keep.view(keep.shape[0], -1, m).sum(-1) <= n).all())


# ----------------------------------------------------------------------------- encode
def encode_bitmask(weight: torch.Tensor, keep: torch.Tensor) -> Encoded:
    out, _ = weight.shape
    values = weight.masked_select(keep)  # row-major order, [nnz]
    counts = keep.sum(1, dtype=torch.int64)
    offsets = torch.zeros(out + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    if values.numel() < 2**31:
        offsets = offsets.to(torch.int32)
    return Encoded("bitmask", {"values": values, "bitmask": pack_bits(keep),
                               "row_offsets": offsets}, tuple(weight.shape))


def _slot_table(n: int, m: int) -> torch.Tensor:
    """``[2**m, n]``: for each keep pattern of a group (bit j = position j kept) with at most n
    kept, the n positions to store, ascending: the kept ones, padded with the first pruned ones."""
    table = torch.zeros(2**m, n, dtype=torch.uint8)
    for code in range(2**m):
        kept = [j for j in range(m) if code >> j & 1]
        if len(kept) > n:
            continue  # never looked up: nm_fits rejects such groups first
        pad = [j for j in range(m) if not code >> j & 1][: n - len(kept)]
        table[code] = torch.tensor(sorted(kept + pad), dtype=torch.uint8)
    return table


def encode_nm(weight: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> Encoded:
    """Caller guarantees ``nm_fits(keep, n, m)``."""
    out, cols = weight.shape
    groups = keep.view(out, cols // m, m)
    if m <= 12:  # lookup table of 2**m rows
        code = (groups.to(torch.int32) << torch.arange(m, dtype=torch.int32)).sum(-1)
        slots = _slot_table(n, m)[code]  # [out, cols/m, n] uint8
    else:  # stable sort puts kept positions first, in column order; then re-sort ascending
        order = torch.argsort((~groups).to(torch.int8), dim=-1, stable=True)[..., :n]
        slots = order.sort(-1).values.to(torch.uint8)
    values = weight.view(out, cols // m, m).gather(-1, slots.long()).reshape(out, -1)
    indices = _pack_fields(slots.reshape(out, -1), index_bits(m))
    return Encoded("nm", {"values": values.contiguous(), "indices": indices}, (out, cols), n, m)


def choose(weight: torch.Tensor, keep: torch.Tensor | None, nm: tuple[int, int] | None) -> Encoded:
    """The smallest encoding of ``weight`` that saves at least ``MIN_SAVING`` over plain."""
    plain = Encoded("plain", {"": weight.contiguous()}, tuple(weight.shape))
    if keep is None or weight.dim() != 2:
        return plain
    esize = weight.element_size()
    budget = (1.0 - MIN_SAVING) * weight.numel() * esize
    shape = tuple(weight.shape)
    if nm is not None and nm_fits(keep, *nm) and nm_nbytes(shape, *nm, esize) <= budget:
        return encode_nm(weight, keep, *nm)
    if bitmask_nbytes(shape, int(keep.sum()), esize) <= budget:
        return encode_bitmask(weight, keep)
    return plain


# ----------------------------------------------------------------------------- decode
def nm_keep(indices: torch.Tensor, shape: tuple[int, int], n: int, m: int) -> torch.Tensor:
    """The keep mask of an N:M encoding: bool ``[out, in]``, True at every stored slot."""
    out, cols = shape
    slots = _unpack_fields(indices, index_bits(m), cols // m * n).view(out, cols // m, n)
    keep = torch.zeros(out, cols // m, m, dtype=torch.bool)
    return keep.scatter_(-1, slots.long(), True).view(out, cols)


def decode(encoding: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...],
           n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Inverse of the encoders: the dense tensor, bit-exact."""
    if encoding == "plain":
        return parts[""]
    out, cols = shape
    if encoding == "bitmask":
        values, keep = parts["values"], unpack_bits(parts["bitmask"], cols)
        if int(parts["row_offsets"][-1]) != values.numel() or int(keep.sum()) != values.numel():
            raise ValueError("bitmask and values disagree")
        dense = torch.zeros(shape, dtype=values.dtype)
        return dense.masked_scatter_(keep, values)
    if encoding == "nm":
        values = parts["values"]
        k = cols // m * n
        slots = _unpack_fields(parts["indices"], index_bits(m), k).view(out, cols // m, n)
        if values.shape != (out, k) or bool((slots >= m).any()) or (
                n > 1 and bool((slots[..., 1:] <= slots[..., :-1]).any())):
            raise ValueError("N:M indices are out of range or not strictly increasing")
        dense = torch.zeros(out, cols // m, m, dtype=values.dtype)
        dense.scatter_(-1, slots.long(), values.view(out, cols // m, n))
        return dense.view(out, cols)
    raise ValueError(f"unknown encoding {encoding!r}")
