"""Writing a checkpoint: a pruned model in memory (:func:`write_checkpoint`, dense as
transformers saves it, or through :func:`~llmprune.io.export.export`) and ``llmprune export``
of a checkpoint directory (:func:`export_checkpoint`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..core.errors import UserError
from .export import check_export_args
# export() under a name that write_checkpoint's parameter `export` does not shadow
from .export import export as write_export
from .meta import MASKS_FILE, is_compact, write_masks, write_meta
from .shards import parse_size
from .sources import check_model_keys, dir_source, model_source, pattern_masks


def mask_shape(model, name: str) -> tuple[int, int]:
    """``(out, in)`` of the matrix that the mask of module ``name`` covers: an ``nn.Linear``'s
    weight, or one expert of a fused expert parameter (``<owner>.expert_linears.<param>.<e>``)."""
    from ..models.experts import expert_weight

    w = expert_weight(model, name)
    return tuple((w if w is not None else model.get_submodule(name).weight).shape)


def write_checkpoint(model, tokenizer, out_dir: Path, meta: dict, masks: dict | None = None,
                     export: str = "dense", dtype: str = "auto", progress: bool = True) -> None:
    """Save the pruned model into ``out_dir``: a dense checkpoint (zeros in place) with the pruning
    masks and ``llmprune.json``, or a compact export (``export="compact"``)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if export == "compact" or dtype != "auto":
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
        write_export(model_source(model, masks, meta), out_dir, export, dtype, progress=progress)
        return
    model.save_pretrained(out_dir)
    if masks:
        # shapes in module order, then the experts' (the file's metadata is part of the output)
        order = [n for n, _ in model.named_modules() if n in masks]
        linears = set(order)
        order += [n for n in masks if n not in linears]
        write_masks(out_dir, {f"{n}.weight": b for n, b in masks.items()},
                    {f"{n}.weight": mask_shape(model, n) for n in order})
    write_meta(out_dir, meta)


def export_checkpoint(src: str, output: str, fmt: str = "compact", dtype: str = "auto",
                      pattern: str | None = None, max_shard_size: str | int = "5GB",
                      overwrite: bool = False, progress: bool = True,
                      on_shard_written: Callable[[int], None] | None = None) -> dict:
    """``llmprune export``: checkpoint directory ``src`` -> ``output`` (written atomically).
    ``on_shard_written``: see :func:`~llmprune.io.export.export`."""
    from .loading import resolve
    from .output import atomic_dir, check_output

    check_export_args(fmt, dtype)
    parse_size(max_shard_size)
    out = check_output(output, overwrite)
    resolved = resolve(src)
    if not Path(resolved).is_dir():
        raise UserError(f"llmprune export reads a local checkpoint directory; {src!r} is not one")
    src_path = Path(resolved)
    check_output(output, overwrite, sources=(str(src_path),))
    source = dir_source(src_path)
    if pattern is not None:
        if source.masks is not None or is_compact(src_path):
            recorded = (source.meta or {}).get("target")
            raise UserError(f"{src} carries its pruning masks (pattern {recorded}); drop "
                            "--pattern, which is only for checkpoints without llmprune metadata")
        source.masks, source.nm = pattern_masks(src_path, source.config, pattern)
    elif source.masks is None and fmt == "compact":
        raise UserError(f"{src} has no llmprune pruning masks ({MASKS_FILE}); pass --pattern "
                        "unstructured or --pattern N:M to take them from the checkpoint's zeros "
                        "(they are verified first)")
    if fmt == "compact" and not is_compact(src_path):
        check_model_keys(src_path)
    with atomic_dir(out, overwrite) as tmp:
        meta = write_export(source, tmp, fmt, dtype, max_shard_size, progress,
                            on_shard_written)
    return meta
