"""PyTorch's semi-structured (2:4) sparse tensors: cuSPARSELt, or CUTLASS where cuSPARSELt is
missing. CUDA on sm80+ only; everything here is a no-op question elsewhere."""

from __future__ import annotations

import torch

from .reference import KernelInputError

_DTYPES = (torch.float16, torch.bfloat16)


def _subclass():
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    return torch.sparse.SparseSemiStructuredTensorCUTLASS


def semi_structured_usable(device: torch.device | str, dtype: torch.dtype,
                           shape: tuple[int, int]) -> bool:
    """Whether a ``shape`` weight of ``dtype`` on ``device`` can become a semi-structured tensor:
    CUDA with compute capability >= 8.0, float16 / bfloat16, and both dimensions multiples of
    the backend's minimum block."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or dtype not in _DTYPES:
        return False
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    limits = _subclass()._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if limits is None:
        return False
    rows, cols = shape
    return (rows >= limits.sparse_min_rows and rows % limits.sparse_min_rows == 0
            and cols >= limits.sparse_min_cols and cols % limits.sparse_min_cols == 0)


def to_semi_structured(dense: torch.Tensor):
    """A dense 2:4 CUDA weight ``[out, in]`` -> a ``SparseSemiStructuredTensor`` for
    ``F.linear(x, W, bias)``. The weight must really be 2:4 (the compression keeps 2 per group)."""
    if not semi_structured_usable(dense.device, dense.dtype, tuple(dense.shape)):
        raise KernelInputError(f"torch semi-structured sparsity needs a float16/bfloat16 CUDA "
                               f"weight on sm80+ with block-aligned shape, got {dense.dtype} "
                               f"{tuple(dense.shape)} on {dense.device}")
    return _subclass().from_dense(dense.contiguous())


def semi_structured_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for a semi-structured ``W``; ``x [..., in]``."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.nn.functional.linear(x2, weight, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])
