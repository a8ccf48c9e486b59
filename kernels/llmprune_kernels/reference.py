"""Pure-PyTorch twins of the 2:4 kernels, and the input checks every implementation shares.

The compact 2:4 layout (the ``nm`` encoding of :mod:`llmprune.compact` with N = 2, M = 4) of a
weight ``W [out, in]``, ``in`` a multiple of 4:

* ``values``  ``[out, in/2]`` in the weight dtype: the 2 stored weights of every group of 4
  consecutive input columns, in ascending column order;
* ``indices`` ``uint8 [out, ceil(in/8)]``: the position (0..3) of every value inside its group,
  2 bits each, little-endian: value ``k`` of a row sits in bits ``2 * (k % 4)`` of byte ``k // 4``.
  One byte holds the four indices of two consecutive groups (group ``2q`` in the low nibble,
  ``2q + 1`` in the high one); the two indices of a group are strictly increasing. When ``in/4``
  is odd the high nibble of a row's last byte is 0.

A group with fewer than 2 kept weights is padded with its first pruned positions (which hold
zeros), so every group has exactly 2 slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelInputError(ValueError):
    """Bad input to a 2:4 kernel (not 2:4, wrong shape, unsupported dtype, ...)."""


class NotTwoFourError(KernelInputError):
    """A weight (or mask) keeps more than 2 of some group of 4."""


# ----------------------------------------------------------------------------- checks
def check_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype not in DTYPES:
        raise KernelInputError(f"{what} has dtype {t.dtype}; the 2:4 kernels support float16, "
                               "bfloat16 and float32")


def check_weight(weight: torch.Tensor, keep: torch.Tensor | None = None) -> None:
    if weight.dim() != 2:
        raise KernelInputError(f"the weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    check_dtype(weight, "the weight")
    if weight.shape[1] % 4:
        raise KernelInputError(f"2:4 needs in_features to be a multiple of 4, got "
                               f"{weight.shape[1]}")
    if keep is not None and tuple(keep.shape) != tuple(weight.shape):
        raise KernelInputError(f"the keep mask has shape {tuple(keep.shape)}, the weight "
                               f"{tuple(weight.shape)}")


def index_bytes(in_features: int) -> int:
    """Bytes of packed indices per row: ``in/2`` indices of 2 bits."""
    return (in_features // 4 + 1) // 2


def check_compact(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> None:
    if in_features % 4 or in_features <= 0:
        raise KernelInputError(f"2:4 needs in_features to be a positive multiple of 4, got "
                               f"{in_features}")
    check_dtype(values, "values")
    if values.dim() != 2 or values.shape[1] != in_features // 2:
        raise KernelInputError(f"values must be [out, {in_features // 2}] for in_features = "
                               f"{in_features}, got {tuple(values.shape)}")
    if indices.dtype != torch.uint8 or tuple(indices.shape) != (values.shape[0],
                                                                index_bytes(in_features)):
        raise KernelInputError(f"indices must be uint8 [{values.shape[0]}, "
                               f"{index_bytes(in_features)}], got {indices.dtype} "
                               f"{tuple(indices.shape)}")
    if values.device != indices.device:
        raise KernelInputError(f"values are on {values.device}, indices on {indices.device}")


def not_two_four_message(bad: torch.Tensor) -> str:
    """One line naming the first group of 4 that keeps more than 2: ``bad`` is bool [out, in/4]."""
    r, g = (int(v) for v in bad.nonzero()[0])
    return (f"the weight is not 2:4: row {r}, columns {4 * g}..{4 * g + 3} keep more than 2 of 4 "
            f"({int(bad.sum())} such groups)")


# ----------------------------------------------------------------------------- compress
def compress_ref(weight: torch.Tensor, keep: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4 weight ``[out, in]`` -> ``(values [out, in/2], indices uint8 [out, ceil(in/8)])``.

    ``keep`` (bool, default ``weight != 0``) says which weights survived pruning. Per group of 4
    the 2 slots are the kept positions, padded with the lowest pruned ones; found here by a top-2
    over the key ``kept * 4 + (3 - position)`` (independent of the export's bit-code encoder).
    """
    check_weight(weight, keep)
    out, cols = weight.shape
    if keep is None:
        keep = weight != 0
    groups = keep.reshape(out, cols // 4, 4)
    counts = groups.sum(-1)
    if bool((counts > 2).any()):
        raise NotTwoFourError(not_two_four_message(counts > 2))
    pos = torch.arange(4, device=weight.device)
    key = groups.to(torch.int64) * 4 + (3 - pos)
    slots = key.topk(2, dim=-1).indices.sort(-1).values  # [out, G, 2], ascending
    values = weight.reshape(out, cols // 4, 4).gather(-1, slots).reshape(out, cols // 2)
    return values.contiguous(), pack_indices(slots.reshape(out, cols // 2))


def pack_indices(idx: torch.Tensor) -> torch.Tensor:
    """int ``[out, k]`` (values 0..3) -> uint8 ``[out, ceil(k/4)]``: value ``k`` at bits
    ``2 * (k % 4)`` of byte ``k // 4``."""
    out, k = idx.shape
    pad = (-k) % 4
    idx = idx.to(torch.int32)
    if pad:
        idx = torch.cat([idx, idx.new_zeros(out, pad)], dim=1)
    fields = idx.reshape(out, -1, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=idx.device)
    return (fields << shifts).sum(-1).to(torch.uint8)


def unpack_indices(indices: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: uint8 ``[out, ceil(k/4)]`` -> int64 ``[out, k]``."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=indices.device)
    fields = (indices.to(torch.int32).unsqueeze(-1) >> shifts) & 3
    return fields.reshape(indices.shape[0], -1)[:, :k].to(torch.int64)


# ----------------------------------------------------------------------------- decompress
def decompress_ref(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """``(values, indices)`` -> the dense weight ``[out, in]``, bit for bit: stored values at their
    positions, ``+0.0`` elsewhere."""
    check_compact(values, indices, in_features)
    out = values.shape[0]
    groups = in_features // 4
    slots = unpack_indices(indices, in_features // 2).reshape(out, groups, 2)
    if bool((slots[..., 1] <= slots[..., 0]).any()):
        raise KernelInputError("2:4 indices are not strictly increasing inside a group: the "
                               "indices tensor is damaged or not in the llmprune compact layout")
    dense = torch.zeros(out, groups, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, slots, values.reshape(out, groups, 2))
    return dense.reshape(out, in_features)


# ----------------------------------------------------------------------------- matmul
def check_matmul(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 bias: torch.Tensor | None) -> int:
    """Checks the operands of ``x @ W.T + bias``; returns ``in_features``."""
    in_features = x.shape[-1]
    check_compact(values, indices, in_features)
    check_dtype(x, "the input")
    if x.dtype != values.dtype:
        raise KernelInputError(f"the input is {x.dtype} but the weight is {values.dtype}")
    if x.device != values.device:
        raise KernelInputError(f"the input is on {x.device} but the weight on {values.device}")
    if bias is not None and (bias.dtype != values.dtype or tuple(bias.shape) != (values.shape[0],)
                             or bias.device != values.device):
        raise KernelInputError(f"bias must be {values.dtype} [{values.shape[0]}] on "
                               f"{values.device}, got {bias.dtype} {tuple(bias.shape)} on "
                               f"{bias.device}")
    return in_features


def matmul_ref(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` for the 2:4 weight ``W`` given compact; ``x [..., in]``. Computed
    in float32 (like the kernel's accumulator) and rounded once to ``x``'s dtype."""
    in_features = check_matmul(x, values, indices, bias)
    w = decompress_ref(values, indices, in_features).float()
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)
