"""The PERP run on a pruned checkpoint: load it with its masks, retrain (:mod:`llmprune.retrain.perp`),
write the result atomically with the same masks."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..core.errors import UserError
from ..evaluate.ppl import timed_perplexity
from ..io.meta import DENSE_FORMAT
from ..retrain.perp import PerpConfig, perp, training_ids

log = logging.getLogger(__name__)


def _check_pruned_dir(model_dir: str) -> Path:
    from ..io.meta import MASKS_FILE, is_compact

    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"--model {model_dir} is not a directory: PERP takes the output directory "
                        "of 'llmprune magnitude|wanda|sparsegpt ... --output DIR'")
    if is_compact(path):
        raise UserError(f"{model_dir} is a compact export; turn it back into a dense checkpoint "
                        "first: llmprune export DIR --format dense --output DENSE_DIR")
    if not (path / MASKS_FILE).exists():
        raise UserError(f"{model_dir} has no {MASKS_FILE}, so it is not an llmprune pruning "
                        "output; prune it first with 'llmprune magnitude|wanda|sparsegpt "
                        "--model ... --output DIR'")
    if not (path / "config.json").exists():
        raise UserError(f"{model_dir} has no config.json; point --model at a pruned checkpoint")
    return path


def _recipe_yaml(src: Path, config: PerpConfig) -> str | None:
    """The source's recipe.yaml with a ``perp`` stage inserted after its solver."""
    import yaml

    path = src / "recipe.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
        stages = list(data["stages"])
    except (yaml.YAMLError, KeyError, TypeError):
        return None
    stages = [s for s in stages if not (isinstance(s, dict) and "perp" in s)]
    perp_stage = {k: v for k, v in config.to_dict().items() if k != "device"}
    stages.insert(1, {"perp": perp_stage})
    head = "# written by llmprune: `llmprune run recipe.yaml --output DIR` reproduces this run\n"
    return head + yaml.safe_dump({**data, "stages": stages}, sort_keys=False)


def perp_checkpoint(model_dir: str, config: PerpConfig, output: str, overwrite: bool = False,
                    eval_ppl: str | None = None, eval_seqlen: int = 1024,
                    eval_max_windows: int | None = 16, progress: bool = True,
                    export: str = "dense", export_dtype: str = "auto",
                    recipe_yaml: str | None = None) -> dict:
    """Load a pruned checkpoint directory, run :func:`perp`, verify, and write a plain checkpoint
    (with the same masks file) atomically to ``output``. Returns the metadata written."""
    from ..core.device import check_device, library_versions
    from ..io.checkpoints import write_checkpoint
    from ..io.data import load_text, tokenize
    from ..io.export import check_export_args
    from ..io.meta import read_masks, read_meta
    from ..loaders import load_model
    from ..io.output import atomic_dir, check_output

    check_device(config.device)
    check_export_args(export, export_dtype, "--export", "--export-dtype")
    src = _check_pruned_dir(model_dir)
    out = check_output(output, overwrite, sources=(str(src),))
    masks = read_masks(src)
    src_meta = read_meta(src) or {}
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tokenizer, _ = load_model(str(src))
    timings["load"] = time.perf_counter() - t
    ids, info = training_ids(tokenizer, config)

    results: dict[str, float] = {}
    eval_ids = None
    if eval_ppl:
        eval_ids = tokenize(tokenizer, load_text(eval_ppl, "eval").text)
        results["pruned_perplexity"], timings["eval_before"] = timed_perplexity(
            model, eval_ids, eval_seqlen, eval_max_windows, config.device, progress,
            "pruned perplexity (before PERP)")

    model, report = perp(model, masks, config, train_ids=ids, progress=progress)
    timings["train"] = report.seconds
    print(f"PERP trained {report.trainable_params:,} of {report.total_params:,} parameters "
          f"({100 * report.trainable_fraction:.4f}%) in {report.seconds:.1f} s; mask of "
          f"{report.sparsity_checked} pruned linears unchanged (pruned positions all zero)",
          flush=True)
    if eval_ids is not None:
        results["perp_perplexity"], timings["eval_after"] = timed_perplexity(
            model, eval_ids, eval_seqlen, eval_max_windows, config.device, progress,
            "perplexity after PERP")

    meta = {k: v for k, v in src_meta.items() if k not in ("evaluations", "timings")}
    meta.update({
        "format": DENSE_FORMAT, "format_version": 1,
        "perp": {"source": str(src), "config": config.to_dict(), **report.to_dict(),
                 "training_data": info,
                 # the pruned model's evaluations, before PERP
                 "source_eval": src_meta.get("eval"),
                 "source_evaluations": src_meta.get("evaluations")},
        "eval": ({"data": eval_ppl, "seqlen": eval_seqlen, "max_windows": eval_max_windows,
                  **results} if eval_ppl else None),
        "versions": library_versions(),
        "timings": {**{f"prune_{k}": v for k, v in (src_meta.get("timings") or {}).items()},
                    **{f"perp_{k}": v for k, v in timings.items()}},
    })
    pruned = {k[: -len(".weight")] if k.endswith(".weight") else k: v for k, v in masks.items()}
    t = time.perf_counter()
    with atomic_dir(out, overwrite) as tmp:
        write_checkpoint(model, tokenizer, tmp, meta, pruned, export, export_dtype, progress)
        text = recipe_yaml if recipe_yaml is not None else _recipe_yaml(src, config)
        if text:
            (tmp / "recipe.yaml").write_text(text)
    meta["timings"]["perp_save"] = time.perf_counter() - t
    return meta


def summary_line(meta: dict) -> str:
    p = meta["perp"]
    return (f"PERP ({p['config']['train']}, {p['config']['lora_variant']}): "
            f"{p['trainable_params']:,} trainable parameters "
            f"({100 * p['trainable_fraction']:.4f}%), loss {p['loss_first']:.3f} -> "
            f"{p['loss_last']:.3f}")
