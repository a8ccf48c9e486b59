"""Solvers. Each module registers itself; importing this package makes all of them available.

The import order below is the order of the solvers in ``llmprune --help`` and in ``sweep``.
"""

from . import magnitude, wanda, sparsegpt  # noqa: F401  (explicit imports fill the registry)
from .base import SOLVERS, Solved, SolverBase, get_solver, option, options_of, register

__all__ = ["SOLVERS", "Solved", "SolverBase", "get_solver", "option", "options_of", "register"]
