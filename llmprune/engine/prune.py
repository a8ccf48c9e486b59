"""Pruning a model in memory as a recipe says (:func:`prune`): OWL allocation, the solver, the
layerwise calibration engine, an optional device map or data-parallel split."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from ..core.device import bf16_is_fast, check_device
from ..core.errors import UserError
from ..io.data import calibration_ids
from ..models import adapter_for
from ..models.experts import expert_linears
from ..recipe import PruneRecipe
from ..solvers import get_solver
from .calibrate import EngineOptions, Report, check_target, prune_layerwise, prune_without_data

log = logging.getLogger(__name__)


def resolve_calib_dtype(recipe: PruneRecipe, solver, model) -> torch.dtype | None:
    """The dtype of the calibration forward passes; None means the model's own dtype."""
    if recipe.calib_dtype != "auto":
        return recipe.torch_calib_dtype
    wanted = solver.auto_calib_dtype
    model_dtype = next(model.parameters()).dtype
    if wanted is None or model_dtype != torch.float32:
        return None
    if wanted == torch.bfloat16 and not bf16_is_fast(recipe.device):
        return None
    return wanted


def prune(model, recipe: PruneRecipe, calib_ids: torch.Tensor | None = None, tokenizer=None,
          keep_masks: bool = False, progress: bool = True, parallel=None,
          device_map: str | None = None) -> Report:
    """Prune ``model`` in place as ``recipe`` says and return a :class:`Report`.

    Calibration ids ``[nsamples, seqlen]`` are taken from ``calib_ids`` or, when None, built from
    the recipe's data with ``tokenizer``. Solvers that need no data (magnitude) never read any.
    ``parallel``: a :class:`llmprune.distributed.DataParallel` (this process's part of a
    data-parallel run) or :class:`~llmprune.distributed.ShardedCalibration`; ``device_map``:
    ``"auto"`` spreads each decoder layer over the visible GPUs (:mod:`llmprune.device_map`).
    """
    check_device(recipe.device)
    adapter = adapter_for(model)
    # fused MoE experts are pruned as one linear per expert, calibrated on the tokens routed to it
    # (or, recipe.moe_calibrate "all", on every calibration token)
    with expert_linears(adapter.layers(model), adapter.experts, model.config,
                        recipe.moe_calibrate):
        return _prune(model, adapter, recipe, calib_ids, tokenizer, keep_masks, progress,
                      parallel, device_map)


def _prune(model, adapter, recipe, calib_ids, tokenizer, keep_masks, progress, parallel,
           device_map) -> Report:
    target = recipe.target
    check_target(model, adapter, target)
    solver = get_solver(recipe.method, **recipe.solver_options())
    torch.manual_seed(recipe.seed)
    opts = EngineOptions(device=recipe.device, batch_size=recipe.batch_size,
                         true_sequential=recipe.true_sequential,
                         calib_dtype=resolve_calib_dtype(recipe, solver, model),
                         keep_masks=keep_masks,
                         progress=progress and (parallel is None or parallel.is_main))
    if device_map is not None:
        from .device_map import layer_placement

        opts = replace(opts, placement=layer_placement(device_map, recipe.device))
    if not needs_calibration(recipe):
        return prune_without_data(model, adapter, solver, target, opts)
    if calib_ids is None:
        if tokenizer is None:
            raise UserError(f"{recipe.method} needs calibration data: pass calib_ids or tokenizer")
        calib_ids, _ = calibration_ids(tokenizer, recipe)
    allocation = None
    if recipe.allocation == "owl":
        from .allocation import owl_targets

        t = time.perf_counter()
        # activation norms from the dense model, in the model's dtype (like Wanda's statistics)
        target, allocation = owl_targets(model, adapter, calib_ids, target, recipe.owl_lambda,
                                         recipe.owl_m, replace(opts, calib_dtype=None))
        allocation["seconds"] = time.perf_counter() - t
    if solver.needs_calibration:
        if parallel is not None:  # this process's batches, statistics combined across all
            solver, calib_ids, opts = parallel.adapt(solver, calib_ids, opts)
        report = prune_layerwise(model, adapter, solver, target, calib_ids, opts)
        report.calib_dtype = str(opts.calib_dtype or next(model.parameters()).dtype)
    else:  # magnitude with OWL: the data set the allocation, the solver still reads none
        report = prune_without_data(model, adapter, solver, target, opts)
    report.allocation = allocation
    if report.uncalibrated:
        log.warning("%d linears (experts no calibration token was routed to) were pruned by "
                    "magnitude; more calibration text (--nsamples) reaches more experts",
                    len(report.uncalibrated))
    return report


def needs_calibration(recipe: PruneRecipe) -> bool:
    """Whether a run reads calibration data: calibrated solvers, and OWL for every solver."""
    return get_solver(recipe.method, **recipe.solver_options()).needs_calibration or \
        recipe.allocation == "owl"
