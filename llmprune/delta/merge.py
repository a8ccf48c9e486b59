"""Merging several fine-tuned deltas onto one base: task arithmetic and TIES, optionally after DARE.

For fine-tuned checkpoints F_1..F_T of one base B, the task vectors are ``tau_t = F_t - B``.

``--method task-arithmetic`` (Ilharco et al. 2023, "Editing Models with Task Arithmetic", Sec. 2):
    W = B + sum_t w_t * tau_t

``--method ties`` (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
Models", Sec. 3 / Algorithm 1), per tensor:
    1. trim:  tau^_t = tau_t with all but the top ``density`` fraction of |tau_t| set to zero
    2. elect: gamma = sign(sum_t w_t * tau^_t)
    3. disjoint mean over the agreeing, non-zero entries:
              A = {t : sign(tau^_t) = gamma, tau^_t != 0},  tau_m = sum_{t in A} w_t tau^_t / |A|
    4. W = B + lambda * tau_m
The paper trims each task vector as a whole; we trim tensor by tensor (so that the merge streams)
and let the weights w_t scale each trimmed vector before the election (all 1 = plain TIES).

``--drop p`` first applies DARE (random drop, 1/(1-p) rescale; Yu et al. 2024, Eq. 2) to every
task vector, as Yu et al. do before merging. Each (model, tensor) pair has its own seeded
generator.

Everything streams tensor by tensor from the safetensors shards: peak RAM is about T + 1 tensors
plus the output shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.masks import lowest_k_mask
from ..io.sources import side_files

METHODS = ("task-arithmetic", "ties")


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the round(density * numel) largest |delta|, zero the rest."""
    flat = delta.reshape(-1)
    n_drop = flat.numel() - int(round(density * flat.numel()))
    if n_drop <= 0:
        return delta.clone()
    drop = lowest_k_mask(flat.abs(), n_drop, dim=0)
    return flat.masked_fill(drop, 0.0).view(delta.shape)


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float,
               lam: float = 1.0) -> torch.Tensor:
    """TIES steps 1-3 times lambda: the merged task vector for one tensor (fp32)."""
    trimmed = torch.stack([w * trim(d.float(), density) for d, w in zip(deltas, weights)])
    gamma = torch.sign(trimmed.sum(0))  # step 2, Eq. in Sec. 3.2 ("elect")
    agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)  # step 3, the set A
    count = agree.sum(0).clamp(min=1)
    return lam * (trimmed * agree).sum(0) / count


def task_arithmetic(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(deltas[0], dtype=torch.float32)
    for d, w in zip(deltas, weights):
        out += w * d.float()
    return out


def merge_models(base: str, finetuned: list[str], weights: list[float] | None = None,
                 method: str = "task-arithmetic", density: float = 0.2, lam: float = 1.0,
                 drop: float = 0.0, seed: int = 0, output: str | None = None,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Merge the task vectors of ``finetuned`` onto ``base`` and write a plain checkpoint."""
    from .dare import check_pair, prune_delta, tensor_generator
    from ..io.export import export
    from ..io.sources import Source
    from ..io.meta import nm_of
    from ..io.loading import resolve
    from ..io.output import atomic_dir, check_output

    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not finetuned:
        raise UserError("give at least one --finetuned checkpoint")
    weights = [1.0] * len(finetuned) if weights is None else list(weights)
    if len(weights) != len(finetuned):
        raise UserError(f"--weights has {len(weights)} values for {len(finetuned)} --finetuned "
                        "checkpoints; give one weight per checkpoint")
    if not (0.0 < density <= 1.0):
        raise UserError(f"--density must be in (0, 1], got {density}")
    if not (0.0 <= drop < 1.0):
        raise UserError(f"--drop must be in [0, 1), got {drop}")
    if not output:
        raise UserError("give --output, the directory for the merged model")
    out = check_output(output, overwrite)
    base_dir = Path(resolve(base))
    tuned_dirs = [Path(resolve(f)) for f in finetuned]
    check_output(str(out), overwrite, sources=(str(base_dir), *map(str, tuned_dirs)))
    pairs = [check_pair(base_dir, t) for t in tuned_dirs]
    rb, readers = pairs[0][0], [rt for _, rt in pairs]
    names = list(readers[0].entries)
    for f, rt in zip(finetuned[1:], readers[1:]):
        missing = [n for n in names if n not in rt.entries]
        if missing:
            raise UserError(f"tensor {missing[0]} of the first --finetuned is missing from {f}")
    config = json.loads((tuned_dirs[0] / "config.json").read_text())
    copy = side_files(tuned_dirs[0])
    meta = {"method": method, "base": base, "finetuned": list(finetuned), "weights": weights,
            "density": density if method == "ties" else None, "lambda": lam, "drop": drop,
            "seed": seed}

    def merged():
        for name in names:
            b = rb.read(name)
            if not b.is_floating_point():
                yield name, readers[0].read(name)
                continue
            deltas = []
            for t, rt in enumerate(readers):
                ft = rt.read(name)
                if drop > 0:
                    d, _ = prune_delta(b, ft, drop, "random", "dare",
                                       tensor_generator(seed, f"{t}:{name}"))
                    deltas.append(d.float())
                else:
                    deltas.append(ft.float() - b.float())
            if method == "ties":
                tau = ties_merge(deltas, weights, density, lam)
            else:
                tau = lam * task_arithmetic(deltas, weights)
            yield name, (b.float() + tau).to(b.dtype)

    with atomic_dir(out, overwrite) as tmp:
        src = Source(merged(), config, None, {"merge": meta}, copy, nm_of(None))
        result = export(src, tmp, "dense", progress=progress)
    return {**meta, "model": result}
