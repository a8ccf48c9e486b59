"""Deprecated: moved to :mod:`llmprune.core.errors`. This module re-exports it for one release."""

import warnings

from .core.errors import (DataError, ModelNotFoundError, OutputExistsError,  # noqa: F401
                          PatternError, UnsupportedArchitectureError, UserError)

warnings.warn("llmprune.errors moved to llmprune.core.errors", DeprecationWarning, stacklevel=2)
