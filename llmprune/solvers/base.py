"""The solver protocol and registry.

A layer-wise solver turns calibration inputs of a group of linears (members of a group read the
same input tensor) into pruned weights and explicit masks. Math lives in pure tensor functions in
each solver's module; the calibration engine (``llmprune.calibrate``) does all orchestration.

A solver is a dataclass registered with :func:`register`. Its fields are its options: each is
declared with :func:`option`, whose ``help`` becomes the CLI flag's help (``--blocksize`` for a
field ``blocksize``), and a recipe stage or ``PruneRecipe`` sets it by name. Its class
attributes say what the rest of the package needs to know:

- ``name`` (the CLI command and recipe stage), ``help`` (one line for ``llmprune --help``);
- ``needs_calibration``; ``auto_calib_dtype`` (forward dtype for ``--calib-dtype auto``);
- ``stats_bytes(in_features)`` and ``work_bytes(...)``: its memory estimate, which the streaming
  engine's memory plan adds up (:func:`llmprune.streaming.plan_memory`).

The CLI, recipes, the streaming memory plan and the API read :data:`SOLVERS`; adding a solver is
one module that calls ``register`` and one import line in ``solvers/__init__.py`` (or, outside
the package, an import of the module that registers it before the CLI parses its arguments).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any, ClassVar, Protocol

import torch

from ..core.errors import UserError
# a solver module declares its options with these
from ..core.options import option, options_of  # noqa: F401
from ..core.sparsity import Sparsity

# Statistics are always accumulated in float32, whatever dtype the forward passes run in.
STATS_DTYPE = torch.float32


@dataclass
class Solved:
    weight: torch.Tensor  # [out, in] float32 (or the input's dtype if exact), zeros where pruned;
    #                       may be the input tensor itself, pruned in place
    mask: torch.Tensor | None  # [out, in] bool, True = kept
    keep_bits: torch.Tensor | None = None  # or the keep mask packed (compact.pack_bits)


class Stats(Protocol):
    tokens: int  # calibration tokens added so far

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of inputs ``x`` shaped ``[..., in_features]``."""


class Solver(Protocol):
    name: str
    help: str
    needs_calibration: bool
    auto_calib_dtype: torch.dtype | None  # forward dtype for `--calib-dtype auto` (None: model's)

    def new_stats(self, in_features: int, device: torch.device) -> Stats | None: ...

    def solve_group(self, weights: list[torch.Tensor], stats: Any, target: Sparsity,
                    names: list[str]) -> Iterable[Solved]:
        """Prune the ``[out, in]`` weights (the model's own tensors, in its dtype) of one input
        group, which share ``stats``; a solver may consume ``stats``, and may prune a weight in
        place (its result's weight is then that tensor). One result per weight, in order; a
        generator lets the engine store each result before the next one is computed."""

    def stats_bytes(self, in_features: int) -> int:
        """Bytes of the statistics of one input group reading ``in_features`` inputs."""

    def work_bytes(self, in_features: int, group_bytes: int, largest: int) -> int:
        """Peak bytes the solve of one group allocates besides its statistics: ``group_bytes``
        is the float32 size of all its members' weights, ``largest`` the element count of its
        largest member."""


class SolverBase:
    """Defaults for a registered solver: no options, float32 column statistics when it needs
    calibration, and a solve that holds a float32 copy of one member, its scores, the
    selection's copy of them and a bool mask."""

    name: ClassVar[str]
    help: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    auto_calib_dtype: ClassVar[torch.dtype | None] = None

    def stats_bytes(self, in_features: int) -> int:
        return in_features * 4 if self.needs_calibration else 0

    def work_bytes(self, in_features: int, group_bytes: int, largest: int) -> int:
        return 3 * largest * 4 + 2 * largest


SOLVERS: dict[str, type] = {}


def register(cls):
    """Add solver class ``cls`` to :data:`SOLVERS` under ``cls.name``."""
    if not getattr(cls, "help", ""):
        raise TypeError(f"solver {cls.__name__} needs a one-line `help`")
    SOLVERS[cls.name] = cls
    return cls


def get_solver(name: str, **options) -> Solver:
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise UserError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}") from None
    return cls(**options)
