"""The sparsity specification: one parser (``Sparsity.parse``) and one N:M divisibility check.

A target is unstructured (a ratio of weights pruned per linear) or N:M semi-structured (keep at
most N of every M consecutive weights along ``in_features``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .errors import PatternError, UserError

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Sparsity:
    """What to prune. ``unstructured`` removes a fraction ``ratio`` of weights;
    ``nm`` keeps at most ``n`` of every ``m`` consecutive weights along ``in_features``."""

    kind: Literal["unstructured", "nm"]
    ratio: float  # fraction of weights set to zero (for N:M: 1 - n/m)
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "unstructured":
            if not (0.0 <= self.ratio < 1.0):
                raise UserError(
                    f"sparsity must be in [0, 1), got {self.ratio}; pass e.g. --sparsity 0.5"
                )
        elif self.kind == "nm":
            if self.n is None or self.m is None or not (0 < self.n < self.m):
                raise PatternError(
                    f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}; pass e.g. --pattern 2:4"
                )
        else:  # pragma: no cover - the Literal type guards this
            raise ValueError(self.kind)

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"{self.ratio:g}"

    @classmethod
    def parse(cls, sparsity: float | None, pattern: str | None) -> "Sparsity":
        """Build from the CLI's ``--sparsity`` and ``--pattern`` values.

        ``pattern`` is ``"unstructured"`` (or None) or ``"N:M"``. For N:M the sparsity is implied;
        a contradicting ``--sparsity`` is an error rather than silently ignored.
        """
        if pattern is None or pattern.strip().lower() in ("", "unstructured", "0:0"):
            if sparsity is None:
                raise UserError("missing --sparsity; pass e.g. --sparsity 0.5 or --pattern 2:4")
            return cls("unstructured", float(sparsity))
        match = _NM_RE.match(pattern)
        if not match:
            raise PatternError(
                f"malformed --pattern {pattern!r}; expected N:M with 0 < N < M, e.g. 2:4 or 4:8"
            )
        n, m = int(match.group(1)), int(match.group(2))
        if not (0 < n < m):
            raise PatternError(
                f"malformed --pattern {pattern!r}; expected N:M with 0 < N < M, e.g. 2:4 or 4:8"
            )
        ratio = 1.0 - n / m
        if sparsity is not None and abs(float(sparsity) - ratio) > 1e-9:
            raise UserError(
                f"--sparsity {sparsity} contradicts --pattern {n}:{m} (which prunes {ratio:g}); "
                "drop --sparsity or make them agree"
            )
        return cls("nm", ratio, n, m)


def check_divisible(name: str, in_features: int, target: Sparsity) -> None:
    """Raise a :class:`PatternError` if an N:M pattern cannot tile a layer's input width."""
    if target.kind == "nm" and in_features % target.m != 0:
        raise PatternError(
            f"--pattern {target.n}:{target.m} does not divide the input width {in_features} of "
            f"layer {name}; choose an M that divides {in_features}"
        )
