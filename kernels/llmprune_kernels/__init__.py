"""2:4 sparse kernels (Triton / CUDA) for llmprune. Installed as `llmprune_kernels`, never as `kernels`.

Every op reads and writes llmprune's compact 2:4 layout (``values [out, in/2]`` + 2-bit packed
``indices uint8 [out, ceil(in/8)]``, see :mod:`.reference`) directly, with no re-packing:

==========================  ==========================  =====================================
op                          Triton kernel               pure-PyTorch twin
==========================  ==========================  =====================================
dense 2:4 -> compact        :func:`compress`            :func:`compress_ref`
compact -> dense            :func:`decompress`          :func:`decompress_ref`
``y = x @ W.T (+ bias)``    :func:`matmul`              :func:`matmul_ref`
==========================  ==========================  =====================================

Importing this package needs neither Triton nor a GPU: Triton is imported on the first call of a
Triton op. The Triton ops run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
:mod:`.semi_structured` wraps PyTorch's semi-structured sparse tensors (CUDA sm80+).
"""

from .reference import (KernelInputError, NotTwoFourError, compress_ref, decompress_ref,
                        matmul_ref)
from .semi_structured import semi_structured_linear, semi_structured_usable, to_semi_structured
from .triton_ops import (compress, decompress, interpreting, matmul, triton_installed,
                         triton_usable)

__all__ = ["KernelInputError", "NotTwoFourError", "compress", "compress_ref", "decompress",
           "decompress_ref", "interpreting", "matmul", "matmul_ref", "semi_structured_linear",
           "semi_structured_usable", "to_semi_structured", "triton_installed", "triton_usable"]
