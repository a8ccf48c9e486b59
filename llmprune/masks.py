"""Deprecated: moved to :mod:`llmprune.core.sparsity` (``Sparsity``, ``check_divisible``) and
:mod:`llmprune.core.masks` (mask selection). This module re-exports them for one release."""

import warnings

from .core.masks import (lowest_k_mask, n_pruned, nm_mask, nm_violations,  # noqa: F401
                         select_mask, unstructured_mask)
from .core.sparsity import Sparsity, check_divisible  # noqa: F401

warnings.warn("llmprune.masks moved to llmprune.core.sparsity and llmprune.core.masks",
              DeprecationWarning, stacklevel=2)
