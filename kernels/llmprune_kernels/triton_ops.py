"""Host side of the Triton 2:4 kernels: checks, launch grids, autotuner choice.

Triton is imported on the first call, never at import time. The kernels run on CUDA tensors, or
on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter, slow: for tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

from .reference import (KernelInputError, NotTwoFourError, check_compact, check_matmul,
                        check_weight, index_bytes)

_INT_VIEW = {2: torch.int16, 4: torch.int32}
_MAGNITUDE = {2: 0x7FFF, 4: 0x7FFFFFFF}  # all bits but the sign


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def interpreter_ready() -> bool:
    """Whether Triton's interpreter can run here: ``TRITON_INTERPRET=1``, and Triton not yet
    imported or imported with it set (Triton jits its own standard library at import, in the mode
    of that moment; ``torch._dynamo``, which transformers imports, imports Triton)."""
    if not interpreting():
        return False
    if "triton" not in sys.modules:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(sys.modules["triton"].language.zeros, InterpretedFunction)


def triton_usable(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    device = torch.device(device)
    if not triton_installed():
        return False
    if interpreting():
        return interpreter_ready() and device.type in ("cpu", "cuda")
    return device.type == "cuda" and torch.cuda.is_available()


def _impl():
    if not triton_installed():
        raise KernelInputError("the Triton kernels need Triton: pip install triton")
    from . import _triton_kernels

    return _triton_kernels.kernels()


def _check_device(t: torch.Tensor) -> None:
    if not triton_usable(t.device):
        if not triton_installed():
            raise KernelInputError("the Triton kernels need Triton: pip install triton")
        if interpreting():
            raise KernelInputError("TRITON_INTERPRET=1 was set after Triton was imported (torch."
                                   "_dynamo and transformers import it): set it before")
        raise KernelInputError(f"the Triton kernels run on CUDA tensors (or on CPU tensors with "
                               f"TRITON_INTERPRET=1), got a tensor on {t.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dimension (the kernels index columns directly)."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- compress
def compress(weight: torch.Tensor, keep: torch.Tensor | None = None, *, block_n: int = 32,
             block_q: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`.reference.compress_ref`: dense 2:4 ``[out, in]`` -> ``(values,
    indices)`` in llmprune's compact layout, bit for bit."""
    check_weight(weight, keep)
    _check_device(weight)
    k = _impl()
    out, cols = weight.shape
    w = _rows(weight).view(_INT_VIEW[weight.element_size()])
    values = torch.empty(out, cols // 2, dtype=weight.dtype, device=weight.device)
    nbytes = index_bytes(cols)
    indices = torch.empty(out, nbytes, dtype=torch.uint8, device=weight.device)
    if keep is not None:
        keep_u8 = _rows(keep.to(device=weight.device, dtype=torch.bool)).view(torch.uint8)
    else:
        keep_u8 = w  # never read
    grid = (triton_cdiv(out, block_n), triton_cdiv(nbytes, block_q))
    err = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=weight.device)
    k["compress"][grid](w, keep_u8, values.view(w.dtype), indices, err, out, cols, nbytes,
                        w.stride(0), keep_u8.stride(0), values.stride(0), indices.stride(0),
                        MAG=_MAGNITUDE[weight.element_size()], HAS_KEEP=keep is not None,
                        BLOCK_N=block_n, BLOCK_Q=block_q)
    if int(err.sum()):
        from .reference import not_two_four_message

        mask = keep if keep is not None else weight != 0
        counts = mask.reshape(out, cols // 4, 4).sum(-1)
        raise NotTwoFourError(not_two_four_message((counts > 2).cpu()))
    return values, indices


# ----------------------------------------------------------------------------- decompress
def decompress(values: torch.Tensor, indices: torch.Tensor, in_features: int, *,
               block_n: int = 32, block_q: int = 32) -> torch.Tensor:
    """Triton twin of :func:`.reference.decompress_ref`: compact -> dense ``[out, in]``, bit for
    bit."""
    check_compact(values, indices, in_features)
    _check_device(values)
    k = _impl()
    out = values.shape[0]
    v = _rows(values).view(_INT_VIEW[values.element_size()])
    idx = _rows(indices)
    dense = torch.empty(out, in_features, dtype=values.dtype, device=values.device)
    nbytes = index_bytes(in_features)
    grid = (triton_cdiv(out, block_n), triton_cdiv(nbytes, block_q))
    err = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=values.device)
    k["decompress"][grid](v, idx, dense.view(v.dtype), err, out, in_features, nbytes,
                          v.stride(0), idx.stride(0), dense.stride(0),
                          BLOCK_N=block_n, BLOCK_Q=block_q)
    if int(err.sum()):
        raise KernelInputError("2:4 indices are not strictly increasing inside a group: the "
                               "indices tensor is damaged or not in the llmprune compact layout")
    return dense


# ----------------------------------------------------------------------------- matmul
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1}


def _bucket(m: int) -> int:
    """Autotuner key for M: the next power of two (capped), so that every prompt length does not
    re-tune."""
    return min(1 << max(m - 1, 0).bit_length(), 8192)


def matmul(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
           bias: torch.Tensor | None = None, *, blocks: dict | None = None) -> torch.Tensor:
    """Triton twin of :func:`.reference.matmul_ref`: ``y = x @ W.T (+ bias)``, ``x [..., in]``,
    ``W`` 2:4 given compact and expanded in registers. Accumulates in float32.

    ``blocks`` fixes ``BLOCK_M / BLOCK_N / BLOCK_K / GROUP_M`` (BLOCK_K a multiple of 8, all
    >= 16 on a GPU); by default the interpreter uses :data:`INTERPRETER_BLOCKS` and a GPU the
    autotuner, with separate configs for small M (decode) and large M."""
    in_features = check_matmul(x, values, indices, bias)
    _check_device(x)
    k = _impl()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m, n = x2.shape[0], values.shape[0]
    interp = interpreting()
    # the interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to nearest even): there
    # the kernel writes float32 and torch rounds
    via_fp32 = interp and x.dtype == torch.bfloat16
    y = torch.empty(m, n, dtype=torch.float32 if via_fp32 else x.dtype, device=x.device)
    if m == 0:
        return y.to(x.dtype).reshape(*lead, n)
    v, idx = _rows(values), _rows(indices)
    b = bias if bias is not None else v  # never read without HAS_BIAS
    args = (x2, v, idx, b, y, m, n, in_features, _bucket(m), x2.stride(0), x2.stride(1),
            v.stride(0), idx.stride(0), y.stride(0))
    flags = dict(HAS_BIAS=bias is not None, UPCAST=via_fp32,
                 IEEE=x.dtype == torch.float32)
    if blocks is None and interp:
        blocks = INTERPRETER_BLOCKS
    if blocks is not None:
        blocks = {"GROUP_M": 1, **blocks}
        if blocks["BLOCK_K"] % 8:
            raise KernelInputError(f"BLOCK_K must be a multiple of 8, got {blocks['BLOCK_K']}")
        grid = (triton_cdiv(m, blocks["BLOCK_M"]) * triton_cdiv(n, blocks["BLOCK_N"]),)
        k["matmul"][grid](*args, **flags, **blocks)
    else:
        tuned = k["matmul_small"] if m <= k_small_m_max() else k["matmul_large"]

        def grid(meta):
            return (triton_cdiv(m, meta["BLOCK_M"]) * triton_cdiv(n, meta["BLOCK_N"]),)
        tuned[grid](*args, **flags)
    return y.to(x.dtype).reshape(*lead, n)


def k_small_m_max() -> int:
    from ._triton_kernels import SMALL_M_MAX

    return SMALL_M_MAX


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
