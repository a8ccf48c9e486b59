"""Bonsai: structured pruning with forward passes only.

After Dery, Kolawole, Kagy, Smith, Neubig & Talwalkar 2024, "Everybody Prune Now: Structured
Pruning of LLMs with only Forward Passes" (arXiv 2402.05406). Notation and equation numbers
follow the paper's method section (numbering as in our notes on the arXiv version; the full text
was not at hand when this was written, so check the numbers against the paper you read):

* Eq. (1): the pruned model is ``argmax_{m in F_p} U(m)``: among sub-models ``m`` of the parent
  that remove a fraction ``p`` of the parameters (the feasible set ``F_p``), the one with the best
  utility ``U`` (here: minus the mean next-token NLL on calibration text).
* Eq. (2): ``U`` is approximated by a linear model of the *keep indicators*
  ``alpha_m in {0,1}^N`` of the N prunable modules, ``U(m) ~ beta^T alpha_m``, fitted by ridge
  regression on ``n`` perturbative samples ``D = {(m_k, U(m_k))}``:
  ``beta_hat = argmin_beta 1/n sum_k (U(m_k) - beta^T alpha_{m_k})^2 + gamma ||beta||^2``.
  (We add an intercept, i.e. centre alpha and U, so that beta_i is the utility of keeping module
  i relative to the average sub-model; the ranking is what matters.)
* Eq. (1) is then solved with the linear surrogate: keep the modules with the largest
  ``beta_hat`` under the parameter budget (here through ``structured.selection``).
* Informative priors (the paper's sub-model sampling section): instead of perturbing all modules
  uniformly, a cheap forward-only importance prior (the paper uses Wanda-style
  ``|W| * ||x||`` / activation statistics) decides which modules are *candidates* for removal in
  an iteration, so that the n forward passes are spent on the modules that could plausibly go.
  Modules with a high prior are kept without being perturbed.
* Iterative pruning: the target is reached in ``iterations`` equal steps; every step re-samples,
  re-fits and prunes from the model pruned so far.

Choices of ours, where the paper leaves room or where a CPU forces it:

* Modules are attention query heads and **blocks** of MLP channels: SmolLM2 has 30 x 1536 MLP
  channels, far too many coefficients for a regression on a few hundred forward passes. Within
  each layer the still-present channels are sorted by the prior and cut into blocks of
  ``mlp_block`` consecutive (by prior) channels; each block is one regression variable.
* Candidates (the regression's variables in a step) are, in every layer, the
  ``candidate_factor`` x as many lowest-prior groups as the prior alone would remove there in
  this step (globally ranked for ``uniform=False``); each sub-model drops every candidate
  independently with probability ``drop_prob`` (0.5 makes the keep indicators balanced, the
  best-conditioned design). The step then removes the candidates with the smallest
  ``beta_hat``, so the regression decides which of the likely-unimportant groups really go.
* Sub-models are evaluated through ``structured.masked`` (forward pre-hooks that zero the removed
  heads / channels: exactly the pruned model), under ``torch.inference_mode`` with every parameter
  ``requires_grad=False``: no autograd graph, only inference memory.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.errors import UserError
from ..core.flags import positive_int
from ..core.options import option

log = logging.getLogger(__name__)

Scores = list  # list[dict[str, torch.Tensor]]: like a mask, higher = more important

# The score that keeps a removed group removed in structured.selection: below any real score.
_PRUNED = -1e30


# --------------------------------------------------------------------------------------------
# targets, shared with LoRAPrune


@dataclass(frozen=True)
class Target:
    """What to remove: ``sparsity`` (fraction of decoder-layer parameters) or per-kind fractions
    ``heads`` / ``mlp`` (of the attention heads / MLP channels)."""

    sparsity: float | None = None
    heads: float | None = None
    mlp: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in asdict(self).items() if v is not None}
        if not given:
            raise UserError("give a target: --sparsity (fraction of decoder-layer parameters "
                            "removed), or --heads and/or --mlp (fractions of heads / channels)")
        if len(given) == 3:
            raise UserError("--sparsity with both --heads and --mlp over-determines the target; "
                            "drop one of them")
        for k, v in given.items():
            if not isinstance(v, (int, float)) or v != v or not (0.0 <= v < 1.0):
                raise UserError(f"--{k} must be a fraction in [0, 1), got {v!r}")

    def scaled(self, frac: float) -> dict:
        """select() keyword arguments for ``frac`` of the way to this target."""
        return {k: v * frac for k, v in asdict(self).items() if v is not None}

    def label(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in asdict(self).items() if v is not None)


def split_target(target: Target, groups, uniform: bool, gqa: str) -> Target:
    """The per-kind form of ``target``: the fractions of heads and of channels that
    ``structured.selection`` removes for it. ``select`` reaches a ``sparsity`` by taking attention
    in coarse steps and letting the MLP absorb the rest, so scaling ``sparsity`` step by step
    would not be monotone in each kind (channels could come back when attention takes a step);
    scaling the two per-kind fractions is, and the last step lands on exactly the mask widths
    ``select`` gives for the full target."""
    from .selection import select

    if target.sparsity is None:
        return target
    ones = [{"heads": torch.ones(g.n_heads), "mlp": torch.ones(g.n_channels)} for g in groups]
    m = select(ones, groups, **target.scaled(1.0), uniform=uniform, gqa=gqa)
    heads = sum(int((~x["heads"]).sum()) for x in m) / sum(g.n_heads for g in groups)
    mlp = sum(int((~x["mlp"]).sum()) for x in m) / sum(g.n_channels for g in groups)
    return Target(heads=heads, mlp=mlp)


def forced_scores(scores: Scores, mask) -> Scores:
    """``scores`` with every group already removed in ``mask`` forced to the bottom, so that
    ``select`` keeps it removed."""
    out = []
    for s, m in zip(scores, mask):
        out.append({k: torch.where(m[k], s[k].float(), torch.full_like(s[k].float(), _PRUNED))
                    for k in ("heads", "mlp")})
    return out


def check_nested(new, old) -> None:
    for n, o in zip(new, old):
        for k in ("heads", "mlp"):
            assert not bool((n[k] & ~o[k]).any()), "a removed group came back"


# --------------------------------------------------------------------------------------------
# the math (pure functions)


def fit_importance(keep: torch.Tensor, utility: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    """Ridge regression of Eq. (2): ``beta_hat`` for keep indicators ``keep`` ``[n, d]`` (1 =
    module kept in sub-model k) and utilities ``utility`` ``[n]``. With an intercept (centred
    columns). ``ridge`` is gamma relative to the mean diagonal of the centred Gram matrix, so it
    does not depend on n or on the drop probability. Returns ``[d]``, float64."""
    X = keep.to(torch.float64)
    y = utility.to(torch.float64)
    Xc = X - X.mean(0, keepdim=True)  # [n, d]
    yc = y - y.mean()
    n, d = Xc.shape
    scale = (Xc * Xc).sum(0).mean().clamp_min(1e-12)
    gamma = ridge * scale
    if d <= n:  # (X^T X + gamma I) beta = X^T y
        A = Xc.T @ Xc + gamma * torch.eye(d, dtype=torch.float64)
        return torch.linalg.solve(A, Xc.T @ yc)
    # the same solution in the n x n form: beta = X^T (X X^T + gamma I)^-1 y
    A = Xc @ Xc.T + gamma * torch.eye(n, dtype=torch.float64)
    return Xc.T @ torch.linalg.solve(A, yc)


def sample_keep(n_samples: int, n_units: int, drop_prob: float,
                generator: torch.Generator) -> torch.Tensor:
    """Keep indicators ``[n_samples, n_units]`` (bool): every unit is dropped independently with
    ``drop_prob``. A sample that would drop nothing drops one unit at random (it carries no
    information otherwise)."""
    keep = torch.rand(n_samples, n_units, generator=generator) >= drop_prob
    none = keep.all(1).nonzero().flatten()
    if none.numel() and n_units:
        keep[none, torch.randint(0, n_units, (none.numel(),), generator=generator)] = False
    return keep


# --------------------------------------------------------------------------------------------
# forward-only statistics


def _proj_names(model) -> tuple[str, str]:
    """(attention output projection, MLP output linear) names inside a decoder layer."""
    from .shrink import layout_of

    _, lay = layout_of(model)  # one-line UserError for a family without a structured layout
    return lay.o, lay.mlp_out


def _layers(model):
    from ..models import adapter_for

    return adapter_for(model).layers(model)


@torch.inference_mode()
def activation_prior(model, ids: torch.Tensor, batch_size: int = 4,
                     progress: bool = True) -> Scores:
    """Forward-only prior (the paper's Wanda-style informative prior): for a head,
    ``||X_h||_F * ||W_o[:, h]||_F`` (the norm of the head's input to the output projection times
    the norm of its output-projection columns); for an MLP channel, ``||x_c||_2 * ||W_down[:, c]||_2``.
    ``ids`` ``[n, seqlen]``. One forward pass over the calibration text."""
    from .shrink import forward_with_hooks, layer_groups

    groups = layer_groups(model)
    o_name, down_name = _proj_names(model)
    sq = [{"heads": torch.zeros(g.n_heads, g.head_dim, dtype=torch.float64),
           "mlp": torch.zeros(g.n_channels, dtype=torch.float64)} for g in groups]
    hooks = []
    for i, layer in enumerate(_layers(model)):
        def o_hook(_m, args, _i=i):
            x = args[0].detach().to(torch.float64)
            g = groups[_i]
            sq[_i]["heads"] += x.reshape(-1, g.n_heads, g.head_dim).pow(2).sum(0)

        def d_hook(_m, args, _i=i):
            x = args[0].detach().to(torch.float64)
            sq[_i]["mlp"] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)

        hooks += [(layer.get_submodule(o_name), o_hook), (layer.get_submodule(down_name), d_hook)]
    forward_with_hooks(model, ids, batch_size, hooks, "bonsai prior", progress)
    out = []
    for i, layer in enumerate(_layers(model)):
        g = groups[i]
        w_o = layer.get_submodule(o_name).weight.detach().to(torch.float64)  # [hidden, H*hd]
        w_d = layer.get_submodule(down_name).weight.detach().to(torch.float64)  # [hidden, C]
        w_o_norm = w_o.pow(2).sum(0).reshape(g.n_heads, g.head_dim).sum(1).sqrt()
        out.append({"heads": (sq[i]["heads"].sum(1).sqrt() * w_o_norm).float(),
                    "mlp": (sq[i]["mlp"].sqrt() * w_d.pow(2).sum(0).sqrt()).float()})
    return out


@torch.inference_mode()
def calibration_loss(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token NLL of ``model`` on ``ids`` ``[n, seqlen]`` (forward passes only)."""
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += batch[:, 1:].numel()
    return nll / count


# --------------------------------------------------------------------------------------------
# the iterative procedure


@dataclass(frozen=True)
class BonsaiConfig:
    target: Target
    uniform: bool = True  # same number of heads / channels removed in every layer
    gqa: str = "even"  # query heads removed evenly within KV groups, or whole KV groups ("kv")
    iterations: int = option(4, "pruning iterations to reach the target", positive_int)
    # n in Eq. (2)
    samples: int = option(48, "sub-models evaluated per iteration (regression samples)",
                          positive_int)
    sub_nsamples: int = option(4, "calibration sequences each sub-model's loss is measured on "
                                  "(the first ones; all of --nsamples feed the prior)",
                               positive_int)
    mlp_block: int = option(64, "MLP channels per regression variable (channels of similar "
                                "prior importance in one layer)", positive_int)
    candidate_factor: float = option(2.0, "candidates per iteration: the groups the "
                                          "forward-only prior would remove at this many times "
                                          "the iteration's amount")
    drop_prob: float = option(0.5, "probability that a candidate is dropped in a sampled "
                                   "sub-model")
    # gamma of Eq. (2)
    ridge: float = option(1.0, "ridge penalty of the regression, relative to the design's "
                               "diagonal")
    batch_size: int = option(2, "sequences per forward pass", positive_int)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.samples < 2 or self.mlp_block < 1 or self.sub_nsamples < 1:
            raise UserError("--iterations, --mlp-block and --sub-nsamples must be >= 1 and "
                            "--samples >= 2")
        if not 0.0 < self.drop_prob < 1.0:
            raise UserError(f"--drop-prob must be in (0, 1), got {self.drop_prob}")
        if self.candidate_factor < 1.0:
            raise UserError(f"--candidate-factor must be >= 1, got {self.candidate_factor}")
        if self.ridge < 0:
            raise UserError(f"--ridge must be >= 0, got {self.ridge}")
        if self.gqa not in ("even", "kv"):
            raise UserError(f"--gqa must be even or kv, got {self.gqa!r}")


@dataclass
class _Unit:
    layer: int
    kind: str  # "heads" | "mlp"
    index: torch.Tensor  # long: the heads / channels of this regression variable


def _units(cand, prior: Scores, block: int) -> list[_Unit]:
    """Regression variables from a candidate mask (True = candidate): one per query head, and the
    candidate channels of a layer sorted by prior and cut into blocks of ``block``."""
    units = []
    for i, c in enumerate(cand):
        for h in c["heads"].nonzero().flatten().tolist():
            units.append(_Unit(i, "heads", torch.tensor([h])))
        ch = c["mlp"].nonzero().flatten()
        if ch.numel():
            ch = ch[prior[i]["mlp"][ch].argsort()]
            for j in range(0, ch.numel(), block):
                units.append(_Unit(i, "mlp", ch[j: j + block]))
    return units


def _submask(mask, units: list[_Unit], keep_row: torch.Tensor):
    sub = [{k: v.clone() for k, v in m.items()} for m in mask]
    for u, keep in zip(units, keep_row.tolist()):
        if not keep:
            sub[u.layer][u.kind][u.index] = False
    return sub


def _candidates(prior: Scores, mask, groups, target: Target, prev: float, frac: float,
                config: "BonsaiConfig"):
    """Candidate mask (True = may be removed in this step), chosen by the prior.

    Uniform widths: in every layer, the ``candidate_factor`` x (what the prior alone would remove
    there in this step) lowest-prior groups still present. (Attention comes in coarse rounds --
    with GQA one query head per KV group -- so widening the *target* would often add no head.)
    Non-uniform: the groups the prior would remove, ranked globally, at ``candidate_factor`` x
    this step's amount."""
    from .selection import select

    kw = dict(uniform=config.uniform, gqa=config.gqa)
    forced = forced_scores(prior, mask)
    if config.uniform:
        now = select(forced, groups, **target.scaled(frac), **kw)
        cand = []
        for p, m, n in zip(prior, mask, now):
            c = {}
            for k in ("heads", "mlp"):
                present = m[k]
                need = int((present & ~n[k]).sum())
                want = min(math.ceil(config.candidate_factor * need), int(present.sum()) - 1)
                c[k] = torch.zeros_like(present)
                if need > 0 and want > 0:
                    idx = present.nonzero().flatten()
                    c[k][idx[p[k][idx].float().argsort(stable=True)[:want]]] = True
            cand.append(c)
        return cand
    wide = prev + config.candidate_factor * (frac - prev)
    now_kw = target.scaled(frac)
    wide_kw = {k: min(v, 0.5 * (1.0 + now_kw[k])) for k, v in target.scaled(wide).items()}
    wider = select(forced, groups, **wide_kw, **kw)
    return [{k: m[k] & ~w[k] for k in ("heads", "mlp")} for m, w in zip(mask, wider)]


def _step_scores(mask, prior: Scores, units: list["_Unit"], beta: torch.Tensor) -> Scores:
    """Scores for ``select`` after a step's regression: removed groups lowest (they stay
    removed), candidates by their fitted importance (a block's beta shared by its channels),
    every other group above all candidates, ordered among themselves by the prior (so that a
    constraint forcing one of them out -- e.g. a KV group without candidates under gqa='even' --
    takes the least important by the prior)."""
    vals = [b / u.index.numel() for u, b in zip(units, beta.tolist())]
    top = max((abs(v) for v in vals), default=0.0) + 1.0
    scores = []
    for m, p in zip(mask, prior):
        s = {}
        for k in ("heads", "mlp"):
            pk = p[k].float()
            rank = pk.argsort(stable=True).argsort().float() / max(pk.numel(), 1)  # [0, 1)
            s[k] = torch.where(m[k], 2 * top + rank, torch.full_like(rank, -2 * top - 1.0))
        scores.append(s)
    for u, v in zip(units, vals):
        scores[u.layer][u.kind][u.index] = v
    return scores


def bonsai_mask(model, calib_ids: torch.Tensor, config: BonsaiConfig, *,
                prior: Scores | None = None,
                utility: Callable[[list], float] | None = None,
                progress: bool = True) -> tuple[list, dict]:
    """Run Bonsai on ``model`` (left unchanged) and return the structured keep mask and a report.

    ``calib_ids`` ``[nsamples, seqlen]``: the prior reads all of them; each sub-model's utility
    is minus the mean NLL on the first ``config.sub_nsamples`` windows. ``prior`` and
    ``utility(mask) -> float`` (higher = better) replace the defaults (tests, other signals).
    """
    from .shrink import full_mask, layer_groups, masked, removed_fraction
    from .selection import check_family, select

    check_family(model, heads=config.target.heads, sparsity=config.target.sparsity,
                 uniform=config.uniform)
    groups = layer_groups(model)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # forward passes only: nothing may build an autograd graph
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    sub_ids = calib_ids[: config.sub_nsamples]
    if utility is None:
        def utility(mask):
            with masked(model, mask):
                return -calibration_loss(model, sub_ids, config.batch_size)
    gen = torch.Generator().manual_seed(config.seed)
    info: dict = {"config": {k: v for k, v in asdict(config).items() if k != "target"},
                  "target": config.target.label(), "steps": []}
    try:
        with torch.inference_mode():
            if prior is None:
                prior = activation_prior(model, calib_ids, config.batch_size, progress)
            info["prior_seconds"] = time.perf_counter() - t0
            mask = full_mask(model)
            info["dense_utility"] = utility(mask)
            kw = dict(uniform=config.uniform, gqa=config.gqa)
            target = split_target(config.target, groups, config.uniform, config.gqa)
            info["per_kind_target"] = target.scaled(1.0)
            bar = tqdm(total=config.iterations * config.samples, desc="bonsai sub-models",
                       unit="model", disable=not progress)
            for step in range(1, config.iterations + 1):
                t = time.perf_counter()
                prev = (step - 1) / config.iterations
                frac = step / config.iterations
                now_kw = target.scaled(frac)
                cand = _candidates(prior, mask, groups, target, prev, frac, config)
                units = _units(cand, prior, config.mlp_block)
                if units:
                    keep = sample_keep(config.samples, len(units), config.drop_prob, gen)
                    utils = torch.empty(config.samples, dtype=torch.float64)
                    for k in range(config.samples):
                        utils[k] = utility(_submask(mask, units, keep[k]))
                        bar.update(1)
                    beta = fit_importance(keep, utils, config.ridge)
                else:  # nothing left to choose from: the prior decides
                    keep, utils, beta = None, None, torch.zeros(0)
                    bar.update(config.samples)
                scores = _step_scores(mask, prior, units, beta)
                new = select(scores, groups, **now_kw, **kw)
                check_nested(new, mask)
                mask = new
                rec = {"step": step, "target": now_kw,
                       "candidates": len(units),
                       "candidate_heads": sum(int(c["heads"].sum()) for c in cand),
                       "candidate_channels": sum(int(c["mlp"].sum()) for c in cand),
                       "removed_fraction": removed_fraction(groups, mask),
                       "utility_mean": float(utils.mean()) if utils is not None else None,
                       "seconds": time.perf_counter() - t}
                info["steps"].append(rec)
                log.info("bonsai step %d/%d: %d candidates, removed %.4f of decoder params",
                         step, config.iterations, len(units), rec["removed_fraction"])
            bar.close()
            info["final_utility"] = utility(mask)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    info["removed_fraction"] = removed_fraction(groups, mask)
    info["seconds"] = time.perf_counter() - t0
    # sub-model scorings (each a forward pass over the sub_nsamples windows), dense and final
    # included; the prior adds one pass over all calibration windows
    info["sub_model_evaluations"] = config.iterations * config.samples + 2
    return mask, info


# --------------------------------------------------------------------------------------------
# checkpoint in, checkpoint out (shared with LoRAPrune)


