"""The Python API. The CLI is a thin layer over these functions.

    import llmprune
    model, tok, _ = llmprune.load_model("smollm2-135m")
    recipe = llmprune.PruneRecipe(method, sparsity=0.5, nsamples=32, seqlen=512)
    report = llmprune.prune(model, recipe, tokenizer=tok)

where ``method`` is a name in ``llmprune.solvers.SOLVERS``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from .calibrate import EngineOptions, Report, check_target, prune_layerwise, prune_without_data
from .core.device import bf16_is_fast, check_device, library_versions
from .core.errors import UserError
from .data import calibration_ids, load_text, tokenize
from .export import write_checkpoint
from .models import adapter_for
from .output import atomic_dir, check_output
from .recipe import CALIB_DTYPES, PruneRecipe
from .solvers import get_solver

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
    return report


def resolved_recipe(recipe: PruneRecipe, forward_dtype: str | None) -> PruneRecipe:
    """``recipe`` with ``calib_dtype: auto`` replaced by the dtype the forward passes really ran
    in. ``auto`` picks bf16 only where bf16 is fast (CPUs with avx512_bf16/AMX, most GPUs), so
    the same recipe gives slightly different weights on different machines (SparseGPT 50% on
    smollm2-135m: perplexity 31.48 with bf16 passes, 31.60 with fp32); the recipe.yaml written
    next to a result spells the dtype out so that it reproduces the result anywhere.
    ``forward_dtype``: ``str(torch dtype)`` of the passes (``Report.calib_dtype``), None if none
    ran."""
    if recipe.calib_dtype != "auto" or forward_dtype is None:
        return recipe
    names = {str(dt): key for key, dt in CALIB_DTYPES.items() if dt is not None}
    return replace(recipe, calib_dtype=names.get(forward_dtype, "auto"))


def prune_meta(model_name: str, resolved: str, recipe: PruneRecipe, report: Report,
               calib_info: dict | None, evaluation: dict | None, timings: dict) -> dict:
    """The llmprune.json of a dense pruning output (in-memory and streaming engines alike)."""
    return {
        "format": "llmprune-dense",
        "format_version": 1,
        "source_model": model_name,
        "resolved_model": resolved,
        "recipe": recipe.to_dict(),
        # the recipe with `calib_dtype: auto` resolved; recipe.yaml holds this one
        "recipe_resolved": resolved_recipe(recipe, report.calib_dtype).to_dict(),
        "target": recipe.target.label,
        "sparsity": report.sparsity,
        "allocation": report.allocation,
        "layers": {r.name: {"shape": list(r.shape), "sparsity": r.sparsity} for r in report.layers},
        "calibration": (dict(calib_info, forward_dtype=report.calib_dtype)
                        if calib_info else None),
        "eval": evaluation,
        "versions": library_versions(),
        "timings": timings,
    }


def needs_calibration(recipe: PruneRecipe) -> bool:
    """Whether a run reads calibration data: calibrated solvers, and OWL for every solver."""
    return get_solver(recipe.method, **recipe.solver_options()).needs_calibration or \
        recipe.allocation == "owl"


def prune_checkpoint(model_name: str, recipe: PruneRecipe, output: str, overwrite: bool = False,
                     eval_ppl: str | None = None, eval_seqlen: int = 1024,
                     eval_max_windows: int | None = 16, trust_remote_code: bool = False,
                     progress: bool = True, export: str = "dense",
                     export_dtype: str = "auto",
                     recipe_yaml: "str | Callable[[PruneRecipe], str] | None" = None,
                     parallel=None, device_map: str | None = None) -> dict:
    """Load, (evaluate,) prune, save atomically, (evaluate). Returns the metadata written.

    ``recipe_yaml``: the text of the recipe.yaml to write, or a function of the resolved recipe
    (see :func:`resolved_recipe`) that returns it; None writes this run's own recipe.
    ``parallel`` / ``device_map``: see :func:`prune`; in a data-parallel run only the main
    process (rank 0) evaluates and writes, the others wait for it."""
    from .evaluate import perplexity
    from .loaders import load_model
    from .loading import resolve

    from .export import check_export_args

    check_device(recipe.device)
    recipe.target  # validate before touching anything
    check_export_args(export, export_dtype, "--export", "--export-dtype")
    out = check_output(output, overwrite)
    resolved = resolve(model_name)
    check_output(output, overwrite, sources=(resolved,))
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tokenizer, resolved = load_model(
        model_name, trust_remote_code=trust_remote_code,
        check=lambda skel: check_target(skel, adapter_for(skel), recipe.target))
    timings["load"] = time.perf_counter() - t

    calib_ids, calib_info = None, None
    if needs_calibration(recipe):
        calib_ids, calib_info = calibration_ids(tokenizer, recipe)
    eval_ids = None
    results: dict[str, float] = {}
    main = parallel is None or parallel.is_main
    if eval_ppl and main:
        eval_text = load_text(eval_ppl, "eval")
        eval_ids = tokenize(tokenizer, eval_text.text)
        t = time.perf_counter()
        results["dense_perplexity"] = perplexity(model, eval_ids, eval_seqlen, eval_max_windows,
                                                 device=recipe.device, progress=progress)
        timings["eval_dense"] = time.perf_counter() - t
        print(f"dense perplexity: {results['dense_perplexity']:.4f}", flush=True)

    t = time.perf_counter()
    report = prune(model, recipe, calib_ids=calib_ids, keep_masks=True, progress=progress,
                   parallel=parallel, device_map=device_map)
    timings["prune"] = time.perf_counter() - t
    timings.update({f"prune_{k}": v for k, v in report.timings.items()})
    ran = resolved_recipe(recipe, report.calib_dtype)

    if eval_ids is not None:
        t = time.perf_counter()
        results["pruned_perplexity"] = perplexity(model, eval_ids, eval_seqlen, eval_max_windows,
                                                  device=recipe.device, progress=progress)
        timings["eval_pruned"] = time.perf_counter() - t
        print(f"pruned perplexity: {results['pruned_perplexity']:.4f}", flush=True)

    meta = prune_meta(model_name, resolved, recipe, report, calib_info,
                      {"data": eval_ppl, "seqlen": eval_seqlen, "max_windows": eval_max_windows,
                       **results} if eval_ppl else None, timings)
    if parallel is not None:
        meta["data_parallel"] = {"world_size": parallel.world_size}
        if not main:
            parallel.barrier()  # rank 0 writes
            return meta
    t = time.perf_counter()
    with atomic_dir(out) as tmp:
        write_checkpoint(model, tokenizer, tmp, meta, report.masks, export, export_dtype,
                         progress)
        if callable(recipe_yaml):
            recipe_yaml = recipe_yaml(ran)
        elif recipe_yaml is None:
            from .recipe import dump

            recipe_yaml = dump(
                model_name, ran,
                {"format": export, "dtype": export_dtype}
                if (export, export_dtype) != ("dense", "auto") else None,
                {"ppl": eval_ppl, "seqlen": eval_seqlen, "max_windows": eval_max_windows}
                if eval_ppl else None)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
    meta["timings"]["save"] = time.perf_counter() - t
    if parallel is not None:
        parallel.barrier()
    return meta
