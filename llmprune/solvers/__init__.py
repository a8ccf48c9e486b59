"""Solvers. Each module registers itself; importing this package makes all of them available."""

from . import magnitude, sparsegpt, wanda  # noqa: F401  (explicit imports fill the registry)
from .base import SOLVERS, Solved, get_solver

__all__ = ["SOLVERS", "Solved", "get_solver"]
