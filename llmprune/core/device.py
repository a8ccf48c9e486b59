"""The compute device and the software it runs: checks that a device exists, whether bf16 is fast
on it, and the library versions recorded in every output's ``llmprune.json``."""

from __future__ import annotations

import platform

import torch

from .errors import UserError


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available; use --device cpu")


def bf16_is_fast(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:  # CPUs with avx512_bf16 / AMX run bf16 GEMMs natively through oneDNN
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def library_versions() -> dict:
    import transformers

    from .. import __version__

    return {"llmprune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
