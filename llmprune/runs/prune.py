"""The pruning run: load a checkpoint, (evaluate,) prune with a layerwise solver, write the
output atomically with its llmprune.json and recipe.yaml, (evaluate). The CLI's solver commands,
recipes and :func:`llmprune.prune_checkpoint` all run it."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from ..core.device import check_device, library_versions
from ..engine.calibrate import Report, check_target
from ..engine.prune import needs_calibration, prune
from ..evaluate.ppl import timed_perplexity
from ..io.data import calibration_ids, load_text, tokenize
from ..io.checkpoints import write_checkpoint
from ..io.meta import DENSE_FORMAT
from ..io.lock import output_lock
from ..io.output import atomic_dir, check_output
from ..models import adapter_for
from ..models.limits import check_seqlen
from ..recipe import CALIB_DTYPES, PruneRecipe

log = logging.getLogger(__name__)


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


def check_inputs(skel, recipe: PruneRecipe, eval_seqlen: int | None) -> None:
    """Before any weight is read: the recipe's target fits the model's layers, and the
    calibration (``recipe.seqlen``, when the solver calibrates) and evaluation windows fit its
    positions."""
    check_target(skel, adapter_for(skel), recipe.target)
    if needs_calibration(recipe):
        check_seqlen(skel.config, recipe.seqlen, "--seqlen")
    if eval_seqlen is not None:
        check_seqlen(skel.config, eval_seqlen, "--eval-seqlen")


def prune_meta(model_name: str, resolved: str, recipe: PruneRecipe, report: Report,
               calib_info: dict | None, evaluation: dict | None, timings: dict) -> dict:
    """The llmprune.json of a dense pruning output (in-memory and streaming engines alike)."""
    return {
        "format": DENSE_FORMAT,
        "format_version": 1,
        "source_model": model_name,
        "resolved_model": resolved,
        "recipe": recipe.to_dict(),
        # the recipe with `calib_dtype: auto` resolved; recipe.yaml holds this one
        "recipe_resolved": resolved_recipe(recipe, report.calib_dtype).to_dict(),
        "target": recipe.target.label,
        "sparsity": report.sparsity,
        "allocation": report.allocation,
        **({"uncalibrated_linears": report.uncalibrated} if report.uncalibrated else {}),
        "layers": {r.name: {"shape": list(r.shape), "sparsity": r.sparsity} for r in report.layers},
        "calibration": (dict(calib_info, forward_dtype=report.calib_dtype)
                        if calib_info else None),
        "eval": evaluation,
        "versions": library_versions(),
        "timings": timings,
    }


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
    from ..io.export import check_export_args

    check_device(recipe.device)
    recipe.target  # validate before touching anything
    check_export_args(export, export_dtype, "--export", "--export-dtype")
    check_output(output, overwrite)
    main = parallel is None or parallel.is_main
    # one run per output, held from here to the rename (only the main process writes)
    with output_lock(output) if main else contextlib.nullcontext():
        return _prune_checkpoint(model_name, recipe, output, overwrite, eval_ppl, eval_seqlen,
                                 eval_max_windows, trust_remote_code, progress, export,
                                 export_dtype, recipe_yaml, parallel, device_map)


def _prune_checkpoint(model_name, recipe, output, overwrite, eval_ppl, eval_seqlen,
                      eval_max_windows, trust_remote_code, progress, export, export_dtype,
                      recipe_yaml, parallel, device_map) -> dict:
    from ..loaders import load_model
    from ..io.loading import resolve

    out = check_output(output, overwrite)  # again, under the lock: a run that just finished
    resolved = resolve(model_name)
    check_output(output, overwrite, sources=(resolved,))
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tokenizer, resolved = load_model(
        model_name, trust_remote_code=trust_remote_code,
        check=lambda skel: check_inputs(skel, recipe, eval_seqlen if eval_ppl else None))
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
        results["dense_perplexity"], timings["eval_dense"] = timed_perplexity(
            model, eval_ids, eval_seqlen, eval_max_windows, recipe.device, progress,
            "dense perplexity")

    t = time.perf_counter()
    report = prune(model, recipe, calib_ids=calib_ids, keep_masks=True, progress=progress,
                   parallel=parallel, device_map=device_map)
    timings["prune"] = time.perf_counter() - t
    timings.update({f"prune_{k}": v for k, v in report.timings.items()})
    ran = resolved_recipe(recipe, report.calib_dtype)

    if eval_ids is not None:
        results["pruned_perplexity"], timings["eval_pruned"] = timed_perplexity(
            model, eval_ids, eval_seqlen, eval_max_windows, recipe.device, progress,
            "pruned perplexity")

    meta = prune_meta(model_name, resolved, recipe, report, calib_info,
                      {"data": eval_ppl, "seqlen": eval_seqlen, "max_windows": eval_max_windows,
                       **results} if eval_ppl else None, timings)
    if parallel is not None:
        meta["data_parallel"] = {"world_size": parallel.world_size}
        if not main:
            parallel.barrier()  # rank 0 writes
            return meta
    t = time.perf_counter()
    with atomic_dir(out, overwrite) as tmp:
        write_checkpoint(model, tokenizer, tmp, meta, report.masks, export, export_dtype,
                         progress)
        if callable(recipe_yaml):
            recipe_yaml = recipe_yaml(ran)
        elif recipe_yaml is None:
            from ..recipe import dump

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
