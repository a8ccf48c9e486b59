"""Sparse linears that stay compressed on a CPU: :class:`CPUSparseLinear`.

Batch-1 decode on a CPU reads every weight once per token, so it is bound by memory bandwidth:
fewer bytes are directly more tokens per second. A :class:`CPUSparseLinear` keeps a pruned bf16
weight ``W [n, k]`` in the compact export's bitmask layout and never decompresses it for decode:

* ``bits``    uint8 ``[n, ceil(k/8)]``: bit ``j % 8`` of byte ``j // 8`` of row ``r`` is
  ``W[r, j]`` kept (little-endian, padding bits clear);
* ``values``  int16 ``[nnz]``: the kept bf16 weights' raw bits in row-major order (the
  export's ``values`` as read, not copied);
* ``offsets`` int64 ``[n + 1]``: row ``r``'s kept values are ``values[offsets[r]:offsets[r+1]]``.

At 50% that is 0.5625 of the dense bytes, at 70% 0.3625. A 2:4 weight (``nm`` encoding) is
converted to this layout on load: the same bytes, and its values are already in row-major order.

``y = x W^T`` for ``x [..., k]``:

* up to :data:`DECODE_ROWS` rows of ``x`` (decode): the native kernel (``llmprune/cpu_kernels.c``)
  on the fastest path this CPU runs -- ``avx512`` (``vpexpandw`` of the kept values into a
  vector, ``vdpbf16ps``) or ``avx2`` (``pshufb`` expand, fp32 FMA) -- threaded over output rows
  (``torch.get_num_threads()``), GIL released; fp32 accumulation, the result rounded to
  ``x.dtype`` once;
* more rows (prefill): the weight is decoded to a dense bf16 temporary and ``F.linear`` runs;
* path ``torch`` (no compiler at install time, or forced): the same two cases in torch alone.

``LLMPRUNE_CPU_KERNEL=avx512|avx2|torch`` forces a path (the tests run each one); a forced path
the CPU or the install lacks is a :class:`~llmprune.core.errors.UserError`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..core.bits import pack_bits, row_popcount, unpack_bits
from ..core.errors import UserError

KERNELS_ABI = 2  # the interface of llmprune/cpu_kernels.c this module calls
try:  # optional C kernels, built at install time where a compiler exists
    from .. import cpu_kernels
    if getattr(cpu_kernels, "ABI", None) != KERNELS_ABI:  # a stale build: reinstall
        cpu_kernels = None
except ImportError:  # pragma: no cover - depends on the install
    cpu_kernels = None

PATHS = ("avx512", "avx2", "torch")
PATH_ENV = "LLMPRUNE_CPU_KERNEL"
DECODE_ROWS = 8  # rows of x up to which the native kernel runs; more decode to dense + F.linear


class CPUKernelError(UserError):
    """A CPU kernel path that cannot run here (forced through LLMPRUNE_CPU_KERNEL)."""


def native_paths() -> tuple[str, ...]:
    """The native paths this CPU and this install run, fastest first (empty without the
    extension)."""
    return tuple(cpu_kernels.paths()) if cpu_kernels is not None else ()


def kernel_path() -> str:
    """The path :func:`bitmask_linear` takes: ``$LLMPRUNE_CPU_KERNEL`` if set, else the fastest
    native path, else ``torch``."""
    forced = os.environ.get(PATH_ENV, "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise CPUKernelError(f"{PATH_ENV}={forced!r}: choose one of {', '.join(PATHS)}")
        if forced != "torch" and forced not in native_paths():
            why = ("the llmprune.cpu_kernels extension is not built (no C compiler at install "
                   "time)" if cpu_kernels is None else "this CPU lacks its instructions")
            raise CPUKernelError(f"{PATH_ENV}={forced}: {why}; use one of "
                                 f"{', '.join(native_paths() + ('torch',))}")
        return forced
    paths = native_paths()
    return paths[0] if paths else "torch"


# ----------------------------------------------------------------------------- the weight
class BitmaskWeight:
    """A bf16 weight ``[n, k]`` in the bitmask layout of this module's docstring."""

    def __init__(self, bits: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                 shape: tuple[int, int]):
        n, k = shape
        if bits.dtype != torch.uint8 or tuple(bits.shape) != (n, (k + 7) // 8):
            raise ValueError(f"bits must be uint8 [{n}, {(k + 7) // 8}], got {bits.dtype} "
                             f"{tuple(bits.shape)}")
        if offsets.dtype != torch.int64 or tuple(offsets.shape) != (n + 1,):
            raise ValueError(f"offsets must be int64 [{n + 1}]")
        nnz = int(offsets[-1])
        if values.dtype != torch.int16 or values.numel() != nnz or not values.is_contiguous():
            raise ValueError(f"values must be contiguous int16 [{nnz}]")
        self.bits, self.values, self.offsets = bits, values, offsets  # contiguous, CPU
        self.shape = (n, k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bits, self.values, self.offsets))


def bitmask_weight(bits: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
                   ) -> BitmaskWeight:
    """From a packed keep mask ``uint8 [n, ceil(k/8)]`` (padding bits clear) and the kept bf16
    ``values [nnz]`` in row-major order (the export's ``bitmask`` parts)."""
    n, k = shape
    bits = bits.contiguous()
    if k % 8:  # the layout needs the padding bits clear
        bits = bits.clone()
        bits[:, -1] &= (1 << (k % 8)) - 1
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(row_popcount(bits).to(torch.int64), 0, out=offsets[1:])
    nnz = int(offsets[-1])
    if values.numel() != nnz:
        raise ValueError(f"the mask keeps {nnz} weights but {values.numel()} values are given")
    raw = values.reshape(-1).to(torch.bfloat16).contiguous().view(torch.int16)  # no copy if bf16
    return BitmaskWeight(bits, raw, offsets, (n, k))


def from_dense(weight: torch.Tensor, keep: torch.Tensor | None = None) -> BitmaskWeight:
    """A dense ``[n, k]`` weight (cast to bf16) and its bool keep mask (default: nonzeros)."""
    w = weight.detach().to(torch.bfloat16)
    keep = (w != 0) if keep is None else keep.bool()
    return bitmask_weight(pack_bits(keep), w[keep], tuple(w.shape))


def from_nm(values: torch.Tensor, keep: torch.Tensor) -> BitmaskWeight:
    """From an ``nm`` encoding's ``values [n, k*N/M]`` and its keep mask ``bool [n, k]`` (every
    stored slot, :func:`llmprune.io.compact.nm_keep`): the slots are ascending within a row, so
    the values are already in the bitmask layout's order."""
    return bitmask_weight(pack_bits(keep), values, tuple(keep.shape))


# ----------------------------------------------------------------------------- the products
def decode_dense(w: BitmaskWeight, path: str | None = None) -> torch.Tensor:
    """The dense bf16 weight ``[n, k]``, bit-exact."""
    n, k = w.shape
    if (path or kernel_path()) == "torch":
        dense = torch.zeros(n, k, dtype=torch.int16)
        dense.masked_scatter_(unpack_bits(w.bits, k), w.values)
        return dense.view(torch.bfloat16)
    dense = torch.empty(n, k, dtype=torch.bfloat16)
    cpu_kernels.bitmask_decode(w.bits.data_ptr(), w.values.data_ptr(), w.offsets.data_ptr(),
                              dense.data_ptr(), n, k, torch.get_num_threads())
    return dense


def bitmask_matmul(x: torch.Tensor, w: BitmaskWeight, path: str) -> torch.Tensor:
    """``x [m, k]`` bf16, 1 <= m <= DECODE_ROWS, on a native path -> ``y [m, n]`` fp32."""
    m, k = x.shape
    n = w.shape[0]
    x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    cpu_kernels.bitmask_matmul(path, x.data_ptr(), w.bits.data_ptr(), w.values.data_ptr(),
                              w.offsets.data_ptr(), y.data_ptr(), m, n, k,
                              torch.get_num_threads())
    return y


def bitmask_linear(x: torch.Tensor, w: BitmaskWeight, bias: torch.Tensor | None = None,
                   path: str | None = None) -> torch.Tensor:
    """``x [..., k] @ W^T + bias`` -> ``[..., n]`` in ``x.dtype``."""
    path = path or kernel_path()
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if path == "torch" or not 1 <= x2.shape[0] <= DECODE_ROWS:
        dense = decode_dense(w, path)
        y = F.linear(x2.to(torch.bfloat16), dense).to(x.dtype)
    else:
        y = bitmask_matmul(x2.to(torch.bfloat16), w, path).to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*lead, n)


def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The dense twin of the avx512 loop (``weight`` bf16 ``[n, k]``, ``k % 32 == 0``,
    ``x [m, k]`` bf16, m <= 8) -> fp32 ``[m, n]``: the reference of the bytes ceiling."""
    if "avx512" not in native_paths():
        raise CPUKernelError("the dense reference loop needs the avx512 path")
    m, k = x.shape
    n = weight.shape[0]
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    cpu_kernels.dense_matmul("avx512", x.data_ptr(), weight.data_ptr(), y.data_ptr(), m, n, k,
                            torch.get_num_threads())
    return y


# ----------------------------------------------------------------------------- the module
class CPUSparseLinear(nn.Module):
    """A drop-in for ``nn.Linear`` whose weight stays in the bitmask layout (int16 raw bits, so
    ``model.to(dtype)`` leaves it alone). CPU only, inference only."""

    def __init__(self, weight: BitmaskWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # not persistent: state_dict() holds what nn.Linear would, minus the weight
        self.register_buffer("bits", weight.bits, persistent=False)
        self.register_buffer("values", weight.values, persistent=False)
        self.register_buffer("offsets", weight.offsets, persistent=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @property
    def weight_bitmask(self) -> BitmaskWeight:
        return BitmaskWeight(self.bits, self.values, self.offsets,
                             (self.out_features, self.in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep: torch.Tensor | None = None
                    ) -> "CPUSparseLinear":
        return cls(from_dense(linear.weight, keep), linear.bias)

    def dense_weight(self) -> torch.Tensor:
        """The dense bf16 weight ``[out, in]``."""
        return decode_dense(self.weight_bitmask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise UserError("CPUSparseLinear runs on the CPU; load with sparse='dense' to move "
                            "the model to another device")
        return bitmask_linear(x, self.weight_bitmask, self.bias)

    def extra_repr(self) -> str:
        nnz = int(self.offsets[-1])
        density = nnz / max(1, self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={density:.3f}")
