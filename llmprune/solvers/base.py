"""The solver protocol and registry.

A layer-wise solver turns calibration inputs of a group of linears (members of a group read the
same input tensor) into pruned weights and explicit masks. Math lives in pure tensor functions in
each solver's module; the calibration engine (``llmprune.calibrate``) does all orchestration.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from ..core.sparsity import Sparsity

# Statistics are always accumulated in float32, whatever dtype the forward passes run in.
STATS_DTYPE = torch.float32


@dataclass
class Solved:
    weight: torch.Tensor  # [out, in] float32 (or the input's dtype if exact), zeros where pruned;
    #                       may be the input tensor itself, pruned in place
    mask: torch.Tensor | None  # [out, in] bool, True = pruned
    keep_bits: torch.Tensor | None = None  # or the keep mask packed (compact.pack_bits)


class Stats(Protocol):
    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of inputs ``x`` shaped ``[..., in_features]``."""


class Solver(Protocol):
    name: str
    needs_calibration: bool
    auto_calib_dtype: torch.dtype | None  # forward dtype for `--calib-dtype auto` (None: model's)

    def new_stats(self, in_features: int, device: torch.device) -> Stats | None: ...

    def solve_group(self, weights: list[torch.Tensor], stats: Any, target: Sparsity,
                    names: list[str]) -> Iterable[Solved]:
        """Prune the ``[out, in]`` weights (the model's own tensors, in its dtype) of one input
        group, which share ``stats``; a solver may consume ``stats``, and may prune a weight in
        place (its result's weight is then that tensor). One result per weight, in order; a
        generator lets the engine store each result before the next one is computed."""


SOLVERS: dict[str, type] = {}


def register(cls):
    SOLVERS[cls.name] = cls
    return cls


def get_solver(name: str, **options) -> Solver:
    from ..core.errors import UserError

    try:
        return SOLVERS[name](**options)
    except KeyError:
        raise UserError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}") from None
