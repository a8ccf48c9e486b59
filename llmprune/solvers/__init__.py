"""Solvers. Each module registers itself; importing this package makes all of them available.

The import order below is the order of the solvers in ``llmprune --help`` and in ``sweep``.
"""

from . import magnitude, wanda, sparsegpt, admm  # noqa: F401  (explicit imports fill the registry)
from .base import SOLVERS, Solved, SolverBase, get_solver, option, options_of, register



def data_free_solver():
    """The solver for a linear that no calibration token reached (an expert the router never
    chose): magnitude, which needs no statistics."""
    return magnitude.Magnitude()


__all__ = ["data_free_solver", "SOLVERS", "Solved", "SolverBase", "get_solver", "option",
           "options_of", "register"]
