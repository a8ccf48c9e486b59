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

Fused expert parameters (3-D, one ``[out, in]`` matrix per expert, or ``[in, out]`` when
``transposed``) are encoded as their expert slices stacked into one 2-D matrix
``[experts * out, in]`` (:func:`stack_experts`): every encoding above works row by row, so this
is each expert's own 2-D encoding, expert after expert, with one ``row_offsets`` over all rows.
:func:`unstack_experts` restores the 3-D tensor.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.bits import POPCOUNT8, count_true, pack_bits, row_popcount, unpack_bits

NATIVE_ABI = 1  # the interface of llmprune/_native.c this module calls
try:  # optional C helper (llmprune/_native.c), built at install time where a compiler exists
    from .. import _native
    if getattr(_native, "ABI", None) != NATIVE_ABI:  # a stale build: reinstall to rebuild it
        _native = None
except ImportError:  # pragma: no cover - depends on the install
    _native = None

ENCODINGS = ("plain", "bitmask", "nm")
# the parts each encoding stores, by suffix (:attr:`Encoded.parts`; "" for plain)
PART_SUFFIXES = {"plain": [""], "bitmask": ["values", "bitmask", "row_offsets"],
                 "nm": ["values", "indices"]}


def stored_keys(name: str, encoding: str) -> list[str]:
    """The names a shard stores tensor ``name``'s parts under: ``name`` itself for plain,
    ``<name>.<suffix>`` for each part of the other encodings."""
    return [f"{name}.{s}" if s else name for s in PART_SUFFIXES[encoding]]


# A compact encoding is used only when it saves at least this fraction of the plain bytes: a
# nearly dense tensor is cheaper to keep plain than to decode.
MIN_SAVING = 0.10


def as_bits(keep: torch.Tensor, cols: int) -> np.ndarray:
    """A keep mask, bool ``[out, cols]`` or already packed, as packed uint8 ``[out, ceil(cols/8)]``
    with the padding bits of every row clear."""
    if keep.dtype != torch.uint8:
        return pack_bits(keep).numpy()
    bits = keep.contiguous().numpy()
    if cols % 8:  # clear the padding bits: they are no weight's
        bits = bits.copy()
        bits[:, -1] &= np.uint8((1 << (cols % 8)) - 1)
    return bits


def as_bool(keep: torch.Tensor, cols: int) -> torch.Tensor:
    """A keep mask, bool ``[out, cols]`` or packed, as bool ``[out, cols]``."""
    return unpack_bits(keep, cols) if keep.dtype == torch.uint8 else keep


_INT_VIEW = {1: (torch.int8, np.int8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32),
             8: (torch.int64, np.int64)}


def select(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t[keep]`` in row-major order, bit-exact (also for bf16, which numpy lacks): numpy's
    ``compress`` on an integer view of the same width is 5x faster than ``masked_select``."""
    if t.device.type != "cpu" or t.element_size() not in _INT_VIEW:
        return t.masked_select(keep)
    tview, nview = _INT_VIEW[t.element_size()]
    raw = t.contiguous().view(tview).numpy().ravel()
    picked = np.compress(keep.contiguous().numpy().ravel(), raw)
    return torch.from_numpy(picked).view(t.dtype)


def select_bits(t: torch.Tensor, bits: np.ndarray, nnz: int | None = None, four: bool = False
                ) -> tuple[torch.Tensor, int | None]:
    """``t[keep]`` (row-major, bit-exact) for a 2-D CPU ``t`` and its packed keep mask ``bits``
    (uint8 ``[out, ceil(in/8)]``, padding bits clear), and the number of pruned positions of
    ``t`` whose raw bits are not all zero (None when not counted). With the native helper both
    come from one pass over ``t`` (2.3x faster than numpy's compress on a 2:4 mask, and no
    [out, in] bool temporary); else through :func:`select` and the unpacked mask. ``four``: most
    mask bytes keep exactly 4 (2:4), a hint for the native copy."""
    out, cols = t.shape
    esize = t.element_size()
    if _native is not None and t.device.type == "cpu" and esize in _INT_VIEW:
        if nnz is None:
            nnz = int(row_popcount(torch.from_numpy(bits).reshape(1, -1)).sum())
        tview, _ = _INT_VIEW[esize]
        values = torch.empty(nnz, dtype=t.dtype)
        written, stray = _native.gather_bits(t.contiguous().view(tview).numpy(),
                                             np.ascontiguousarray(bits),
                                             values.view(tview).numpy(), out, cols, esize,
                                             four)
        if written != nnz:  # padding bits set: not a mask this module made
            raise ValueError(f"the packed mask has {written} kept positions inside the rows, "
                             f"expected {nnz}")
        return values, stray
    return select(t, unpack_bits(torch.from_numpy(bits), cols)), None


def _count_raw(t: torch.Tensor) -> int:
    """Elements whose bits are not all zero (so -0.0 counts: it would not survive a round trip
    through a pruned position, which decodes to +0.0)."""
    if t.device.type == "cpu" and t.element_size() in _INT_VIEW:
        return int(np.count_nonzero(t.contiguous().view(_INT_VIEW[t.element_size()][0]).numpy()))
    return int(torch.count_nonzero(t.contiguous().view(_INT_VIEW[t.element_size()][0])))


def pruned_are_zero(t: torch.Tensor, keep: torch.Tensor, enc: "Encoded | None" = None) -> bool:
    """Whether every position of ``t`` outside ``keep`` (bool or packed) holds +0.0, checked by
    counting: the kept values (already gathered by ``enc`` when it is compact) hold every nonzero
    bit pattern (or, when the native helper gathered them, by its count of such positions)."""
    if enc is not None and enc.stray is not None:
        return enc.stray == 0
    if enc is not None and enc.encoding in ("bitmask", "nm"):
        kept = enc.parts["values"]  # N:M pads with pruned positions, which must be +0.0 anyway
    else:
        kept = select(t, as_bool(keep, t.shape[-1]).view(t.shape))
    return _count_raw(kept) == _count_raw(t)


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
    # pruned positions of the source whose raw bits are nonzero, when the encoder counted them
    stray: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


# ----------------------------------------------------------------------------- 3-D experts
def stacked_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    """``[E, out, in]`` (``transposed``: ``[E, in, out]``) -> ``(E * out, in)``."""
    experts, a, b = shape
    return (experts * b, a) if transposed else (experts * a, b)


def stack_experts(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A fused expert parameter ``[E, out, in]`` (``transposed``: ``[E, in, out]``) as the 2-D
    ``[E * out, in]`` of its experts' ``[out, in]`` matrices, one after another (a view when not
    transposed, else a copy)."""
    if transposed:
        t = t.transpose(1, 2)
    return t.contiguous().reshape(stacked_shape(tuple(t.shape), False))


def unstack_experts(t: torch.Tensor, shape: tuple[int, ...], transposed: bool) -> torch.Tensor:
    """Inverse of :func:`stack_experts`: ``[E * out, in]`` -> the parameter's ``shape``."""
    experts, a, b = shape
    if transposed:  # [E * out, in] -> [E, out, in] -> [E, in, out]
        return t.reshape(experts, b, a).transpose(1, 2).contiguous()
    return t.reshape(shape)


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
    """``keep``: bool ``[out, in]`` or packed (:func:`pack_bits`)."""
    out, cols = weight.shape
    bits = torch.from_numpy(as_bits(keep, cols))
    counts = row_popcount(bits)  # kept per row, from the packed mask (1/8 of the data)
    offsets = torch.zeros(out + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    if weight.device.type == "cpu" and _native is not None:  # row-major order, [nnz]
        values, stray = select_bits(weight, bits.numpy(), int(offsets[-1]))
    else:  # the mask as given (a bool mask needs no round trip through the packed one)
        values, stray = select(weight, as_bool(keep, cols)), None
    if values.numel() < 2**31:
        offsets = offsets.to(torch.int32)
    return Encoded("bitmask", {"values": values, "bitmask": bits,
                               "row_offsets": offsets}, tuple(weight.shape), stray=stray)


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


def _popcount8(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return POPCOUNT8.numpy().astype(np.uint8)[x]


@functools.lru_cache(maxsize=None)
def _byte_tables(n: int, m: int):
    """Per byte of a packed keep mask (``8 // m`` whole groups of ``m``, bit j of a group's
    nibble/byte = position j kept), for M in (4, 8) and groups keeping at most n:

    * ``padded``: the slot mask, short groups padded with their first pruned positions;
    * ``words``: the packed indices of those slots, ``b`` bits each, group after group (the
      ``nm`` index layout), as a little-endian integer of ``8 // m * n * b`` bits (at least 8).
    """
    b, per, full = index_bits(m), 8 // m, (1 << m) - 1
    padded = np.zeros(256, np.uint8)
    words = np.zeros(256, {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}[max(1, per * n * b // 8)])
    for byte in range(256):
        word = slot_bits = 0
        for g in range(per):
            code = byte >> (m * g) & full
            kept = [j for j in range(m) if code >> j & 1]
            if len(kept) > n:
                break  # never looked up: such masks are rejected first
            slots = sorted(kept + [j for j in range(m) if not code >> j & 1][: n - len(kept)])
            for i, j in enumerate(slots):
                word |= j << (b * (g * n + i))
                slot_bits |= 1 << (m * g + j)
        else:
            padded[byte], words[byte] = slot_bits, word
    return padded, words


def _indices_2of4(x: np.ndarray) -> np.ndarray:
    """2:4 index bytes straight from mask bytes whose two nibbles each have exactly two bits set,
    both nibbles at once (a table lookup per byte costs 3x more). A nibble's first kept position
    is 0 if bit 0 is set, else 1 if bit 1 is, else 2; its last is 3 if bit 3 is set, else 2 if
    bit 2 is, else 1; the index nibble is first | last << 2."""
    u = np.uint8
    lows, nx = u(0x11), ~x
    a = nx & lows  # bit 0 clear
    first = a + (a & (nx >> u(1)))  # + bit 1 clear too
    last = lows + (((x >> u(2)) | (x >> u(3))) & lows) + ((x >> u(3)) & lows)
    return first | (last << u(2))


def _encode_nm_bytes(weight: torch.Tensor, bits: np.ndarray, n: int, m: int) -> Encoded | None:
    """The N:M encoder for M in (4, 8) and ``in % 8 == 0``, straight from the packed keep mask:
    every byte of the mask holds whole groups, so a lookup per byte gives the packed indices
    (and, for short groups, the padded slots). None when some group keeps more than n."""
    out, cols = weight.shape
    # kept per group, by popcount (a table lookup per byte costs 10x more)
    groups = [bits] if m == 8 else [bits & np.uint8(15), bits >> np.uint8(4)]
    counts = [_popcount8(g) for g in groups]
    if bits.size and max(int(c.max()) for c in counts) > n:
        return None
    short = bits.size and min(int(c.min()) for c in counts) < n
    padded, words = _byte_tables(n, m)
    slots = padded[bits] if short else bits  # short groups are padded with pruned positions
    values, stray = select_bits(weight, slots, out * (cols // m * n), four=(n, m) == (2, 4))
    word_bits = 8 // m * n * index_bits(m)
    if (n, m) == (2, 4) and not short:
        packed = _indices_2of4(bits)
    elif word_bits == 4:  # two mask bytes per index byte
        w = words[bits]
        packed = w[:, 0::2] | (w[:, 1::2] << np.uint8(4))
    else:
        packed = words[bits].view(np.uint8)
    return Encoded("nm", {"values": values.view(out, cols // m * n),
                          "indices": torch.from_numpy(np.ascontiguousarray(packed))},
                   (out, cols), n, m, stray=stray)


def _encode_nm_fast(weight: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> Encoded | None:
    """N:M encoding of a CPU weight; ``keep`` bool or packed. None when the mask is not N:M."""
    out, cols = weight.shape
    word_bits = 8 // m * n * index_bits(m) if m in (4, 8) else 0
    if (word_bits in (8, 16, 32) or (word_bits == 4 and cols % 16 == 0)) and cols % 8 == 0:
        return _encode_nm_bytes(weight, as_bits(keep, cols), n, m)
    keep = as_bool(keep, cols)
    return _encode_nm_general(weight, keep, n, m) if nm_fits(keep, n, m) else None


def encode_nm(weight: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> Encoded:
    """Caller guarantees ``nm_fits(keep, n, m)``; ``keep`` bool or packed."""
    if weight.device.type == "cpu":
        enc = _encode_nm_fast(weight, keep, n, m)
        if enc is None:
            raise ValueError(f"the mask is not {n}:{m}")
        return enc
    return _encode_nm_general(weight, as_bool(keep, weight.shape[1]), n, m)


def _encode_nm_general(weight: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> Encoded:
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
    """The smallest encoding of ``weight`` that saves at least ``MIN_SAVING`` over plain.
    ``keep``: bool ``[out, in]``, or packed (:func:`pack_bits`), which spares unpacking it."""
    plain = Encoded("plain", {"": weight.contiguous()}, tuple(weight.shape))
    if keep is None or weight.dim() != 2:
        return plain
    esize = weight.element_size()
    budget = (1.0 - MIN_SAVING) * weight.numel() * esize
    shape = tuple(weight.shape)
    if nm is not None and shape[1] % nm[1] == 0 and nm_nbytes(shape, *nm, esize) <= budget:
        if weight.device.type == "cpu":
            enc = _encode_nm_fast(weight, keep, *nm)  # None when the mask is not N:M
            if enc is not None:
                return enc
        elif nm_fits(as_bool(keep, shape[1]), *nm):
            return _encode_nm_general(weight, as_bool(keep, shape[1]), *nm)
    if bitmask_nbytes(shape, count_true(keep), esize) <= budget:
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
