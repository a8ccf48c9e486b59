"""Streaming pruning of checkpoints larger than RAM, and resuming a run after a crash.

The model is never whole in memory:

1. The model is built as a skeleton (parameters on the meta device, no memory; the small
   computed buffers such as rotary frequencies are real). The tensors outside the decoder
   layers (embeddings, final norm, lm_head) are memory-mapped to capture the first layer's
   inputs, so only the calibration tokens' embedding rows become resident, then dropped again.
2. Each decoder layer is read from the checkpoint's safetensors shards, only its own tensors
   (:class:`llmprune.io.safetensors.SafetensorsFiles`: ``readinto`` at the recorded offsets, not mmap, so
   the rest of a shard is never resident and a 3 GiB address-space limit is not spent on maps),
   pruned and propagated with the in-memory engine's own step
   (:func:`llmprune.engine.calibrate.prune_layer`, hence bit-identical results), written out as that
   layer's shard of the final checkpoint, and put back on the meta device before the next one.
3. The tensors outside the layers are copied through, byte for byte, at the end.

Crash resume: the run works in ``OUTPUT.partial/`` next to the output::

    progress.json         commit point: recipe/model/calibration fingerprint, last completed layer
    model/model-0000k-of-0000n.safetensors   one finished shard per decoder layer (becomes OUTPUT)
    masks/layer-0000i.safetensors            that layer's keep masks (1 bit per weight)
    acts-0/, acts-1/      hidden states entering the next layer, one file per batch; input of
                          layer i lives in acts-(i % 2), so the record of the last completed layer
                          is never the one being overwritten

Every file is written to a temporary name, fsynced and renamed; ``progress.json`` is written last
for each layer, so a run killed at any instant (SIGKILL included) resumes from the last layer whose
record is complete, and the result is bit-identical to an uninterrupted run. The top of
``OUTPUT.partial`` never holds ``config.json`` or ``llmprune.json``; ``model/`` gets them last and
is renamed to ``OUTPUT``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.errors import CorruptCheckpointError, ResumableError, UserError
from ..engine.calibrate import (EngineOptions, LinearReport, Report, capture_inputs, check_target,
                                prune_layer)
from ..engine.streaming import (PROGRESS_VERSION, DiskActivations, gib, load_layer, load_outside,
                                memory_plan, meta_skeleton, parse_memory, prefer_mmap,
                                read_tensors, save_hidden, to_meta, work_dir, write_json)
from ..io.lock import output_lock
from ..models.experts import expert_linears
from ..models.limits import check_seqlen
from ..io.meta import MASKS_FILE, META_FILE, read_meta, write_meta
from ..io.output import publish_dir
from ..io.safetensors import WEIGHT_FILE_RE, SafetensorsFiles, checkpoint_files, write_safetensors

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the run
def _fingerprint(recipe, resolved: str, files: SafetensorsFiles, calib_info: dict | None) -> dict:
    h = hashlib.sha256()
    for name, (path, info, _) in files.entries.items():
        h.update(f"{path.name}:{name}:{info['dtype']}:{info['shape']}:{info['data_offsets']}"
                 .encode())
    for path in dict.fromkeys(p for p, _, _ in files.entries.values()):
        h.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return {"recipe": recipe.to_dict(), "model": resolved, "checkpoint_sha256": h.hexdigest(),
            "calibration_ids_sha256": calib_info["ids_sha256"] if calib_info else None}


def _check_resume(progress: dict, fingerprint: dict, work: Path) -> None:
    if progress.get("version") != PROGRESS_VERSION:
        raise UserError(f"{work} was written by another llmprune version; remove it or pass "
                        "--overwrite to start again")
    old = progress["fingerprint"]
    for key, what in (("model", "model"), ("checkpoint_sha256", "checkpoint files"),
                      ("calibration_ids_sha256", "calibration data")):
        if old.get(key) != fingerprint[key]:
            raise UserError(f"--resume: the {what} differ from the interrupted run's in {work}; "
                            "resume with the same arguments, or pass --overwrite to start again")
    was, now = old["recipe"], fingerprint["recipe"]
    diff = [f"{k}: {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now))
            if was.get(k) != now.get(k)]
    if diff:
        raise UserError(f"--resume: the recipe differs from the interrupted run's in {work} "
                        f"({'; '.join(diff)}); resume with the same arguments, or pass "
                        "--overwrite to start again")


def _finished(work: Path, out: Path) -> bool:
    """Whether ``out`` is the finished output of the run recorded in ``work`` (the process was
    killed between the final rename and removing the work directory)."""
    try:
        run_id = json.loads((work / "progress.json").read_text())["run_id"]
        meta = read_meta(out)
    except (OSError, ValueError, KeyError, CorruptCheckpointError):
        return False
    if meta is None:
        return False
    meta = meta.get("source_meta") or meta  # a compact export keeps the run's meta inside
    return (meta.get("streaming") or {}).get("run_id") == run_id


def check_fusions(fusions: dict, prefix: str) -> None:
    """Tensors that transformers fuses from several checkpoint keys (MoE experts saved one by
    one) are fused a decoder layer at a time (:func:`llmprune.engine.streaming.load_layer`):
    each must lie inside one layer (``prefix`` = the layer list's path and a dot)."""
    for target, fusion in fusions.items():
        keys = [k for ks in fusion.sources.values() for k in ks]
        layer = target[len(prefix):].split(".")[0] if target.startswith(prefix) else None
        if layer is None or any(not k.startswith(f"{prefix}{layer}.") for k in keys):
            raise UserError(f"transformers fuses checkpoint tensors {keys[0]}, ... into "
                            f"{target}, which is not inside one decoder layer; llmprune streams "
                            "only such tensors of one layer: run without --stream/--max-memory/"
                            "--resume")


def prune_streaming(model_name: str, recipe, output: str, overwrite: bool = False,
                    resume: bool = False, max_memory: str | None = None,
                    activations_offload: str = "ram", export: str = "dense",
                    export_dtype: str = "auto", trust_remote_code: bool = False,
                    progress: bool = True, max_shard_size: str | int = "2GB",
                    recipe_yaml: str | None = None, max_layers: int | None = None,
                    on_layer: Callable[[int, str], None] | None = None) -> dict:
    """Prune checkpoint ``model_name`` layer by layer straight from its safetensors files into
    ``output`` (see the module docstring). ``max_layers`` (benchmarks only) prunes just the
    first N layers and writes no checkpoint. ``on_layer(i, stage)`` is called with stage "mid"
    halfway through writing decoder layer ``i``'s shard (flushed, not yet renamed) and "after"
    once layer ``i`` is recorded as complete (crash tests kill the process there). Returns the
    metadata written (llmprune.json)."""
    work = work_dir(Path(output).expanduser().resolve())
    with output_lock(output), contextlib.ExitStack() as stack:
        existed = work.exists()
        try:
            return _prune_streaming(model_name, recipe, output, overwrite, resume, max_memory,
                                    activations_offload, export, export_dtype,
                                    trust_remote_code, progress, max_shard_size, recipe_yaml,
                                    max_layers, on_layer, stack.enter_context)
        except ResumableError:
            raise
        except UserError:
            # bad input found midway: the work directory this run created cannot be resumed
            # into a result, so it goes (one that was there before, the user's, stays)
            if not existed:
                shutil.rmtree(work, ignore_errors=True)
            raise


def _prune_streaming(model_name, recipe, output, overwrite, resume, max_memory,
                     activations_offload, export, export_dtype, trust_remote_code, progress,
                     max_shard_size, recipe_yaml, max_layers, on_layer, enter) -> dict:
    """The run; ``enter`` enters a context manager until the run ends (the fused MoE experts'
    ExpertLinears, installed on the skeleton as the in-memory engine installs them)."""
    from ..io.data import calibration_ids
    from ..engine.prune import needs_calibration, resolve_calib_dtype
    from .prune import prune_meta
    from ..core.device import check_device
    from ..io.export import check_export_args
    from ..io.loading import checkpoint_keys, load_config, resolve
    from ..io.output import check_output
    from ..solvers import get_solver

    t_start = time.perf_counter()
    check_device(recipe.device)
    target = recipe.target
    check_export_args(export, export_dtype, "--export", "--export-dtype")
    if activations_offload not in ("ram", "disk"):
        raise UserError(f"--activations-offload must be ram or disk, got {activations_offload!r}")
    if recipe.allocation != "uniform":
        raise UserError("--allocation owl reads every layer's dense activations before pruning; "
                        "it is not supported by the streaming engine yet: drop --stream/"
                        "--max-memory/--resume/--activations-offload, or use --allocation "
                        "uniform")
    budget = parse_memory(max_memory) if max_memory else None
    if budget is not None:
        prefer_mmap()  # first: the tokenizer and the calibration text must not grow the heap
    out = Path(output).expanduser().resolve()
    work = work_dir(out)
    if _finished(work, out):
        shutil.rmtree(work)  # killed after the final rename: the output is complete
    if resume and work.exists() and out.exists() and not overwrite:
        raise UserError(f"--output {output} exists and {work} too; pass --overwrite with "
                        "--resume to replace the old output when the resumed run completes")
    check_output(output, overwrite)
    resolved = resolve(model_name)
    if not Path(resolved).is_dir():
        raise UserError(f"--stream reads a local checkpoint directory; {model_name!r} is not one "
                        "(download it first, e.g. with huggingface-cli download)")
    src = Path(resolved)
    check_output(output, overwrite, sources=(resolved,))
    if work.exists() and not resume and not overwrite:
        raise UserError(f"{work} holds an interrupted run of this output; pass --resume to "
                        "continue it, or --overwrite to start again")
    config = load_config(resolved, trust_remote_code)
    from ..models import adapter_for

    files = SafetensorsFiles(checkpoint_files(src))
    skel = meta_skeleton(config, files.float_dtype(), trust_remote_code)
    renames, fusions = checkpoint_keys(skel, files.entries)
    files.rename(renames)
    adapter = adapter_for(skel)
    check_fusions(fusions, adapter.layers_path + ".")
    # fused MoE experts: one ExpertLinear per expert, read from the layer's weights once loaded
    enter(expert_linears(adapter.layers(skel), adapter.experts, skel.config,
                         recipe.moe_calibrate))
    check_target(skel, adapter, target)
    if needs_calibration(recipe):
        check_seqlen(config, recipe.seqlen, "--seqlen")
    solver = get_solver(recipe.method, **recipe.solver_options())
    calib_dtype = resolve_calib_dtype(recipe, solver, skel)
    from transformers import AutoTokenizer

    tokenizer = None
    calib_ids, calib_info = None, None
    if needs_calibration(recipe):
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved,
                                                      trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the tokenizer of {model_name}: {exc}") from None
        calib_ids, calib_info = calibration_ids(tokenizer, recipe)
    # after the tokenizer and the calibration ids, which the process base then includes; still
    # before any weight is read
    plan = memory_plan(files, skel, adapter, recipe, solver, calib_dtype, activations_offload,
                       fusions)
    if budget is not None and plan.total > budget:
        raise UserError(
            f"--max-memory {max_memory} is too small: this run needs about {gib(plan.total)} "
            f"(process {gib(plan.base)} + largest layer {gib(plan.layer)} + activations "
            f"{gib(plan.activations)} + solver statistics {gib(plan.stats)} + solver working "
            f"memory {gib(plan.work)} for {plan.peak_group}; embeddings etc. "
            f"{gib(plan.outside)} while capturing); raise --max-memory, lower --nsamples/"
            "--seqlen/--batch-size, or add --activations-offload disk")
    fingerprint = _fingerprint(recipe, resolved, files, calib_info)

    state = None
    if resume and (work / "progress.json").exists():
        state = json.loads((work / "progress.json").read_text())
        _check_resume(state, fingerprint, work)
    elif work.exists():
        shutil.rmtree(work)
    for stale in work.rglob(".*.tmp") if work.exists() else ():
        stale.unlink()
    (work / "model").mkdir(parents=True, exist_ok=True)
    (work / "masks").mkdir(exist_ok=True)
    if state is None:
        state = {"version": PROGRESS_VERSION, "run_id": os.urandom(8).hex(),
                 "fingerprint": fingerprint, "completed": -1,
                 "layers": [], "timings": {}, "memory_plan": plan.as_dict()}
        write_json(work / "progress.json", state)
    else:
        log.info("resuming %s after layer %d", work, state["completed"])

    torch.manual_seed(recipe.seed)
    # true-sequential's one-pass schedule holds every batch's activations inside the layer:
    # never with activations on disk, and within --max-memory beyond the plan (same results)
    opts = EngineOptions(device=recipe.device, batch_size=recipe.batch_size,
                         true_sequential=recipe.true_sequential, calib_dtype=calib_dtype,
                         keep_masks=True, progress=progress,
                         fused=False if activations_offload == "disk" else None,
                         fuse_budget=None if budget is None else max(budget - plan.total, 0))
    prefix = adapter.layers_path + "."
    by_layer: dict[int, list[str]] = {}
    outside_names: list[str] = []
    for name in files.entries:
        if name.startswith(prefix):
            by_layer.setdefault(int(name[len(prefix):].split(".")[0]), []).append(name)
        else:
            outside_names.append(name)
    layers = adapter.layers(skel)
    n_layers = len(layers) if max_layers is None else min(max_layers, len(layers))
    n_shards = len(layers) + 1
    timings: dict[str, float] = dict(state.get("timings", {}))
    report = Report(masks={})
    layer_seconds: list[float] = []

    inputs = None
    start = state["completed"] + 1
    if solver.needs_calibration and start < n_layers:
        t = time.perf_counter()
        load_outside(skel, files, outside_names)
        captured = capture_inputs(skel, adapter, calib_ids, opts)
        to_meta(skel)
        skel.tie_weights()
        kwargs = [kw for _, kw in captured]
        parity = start % 2
        if start > 0:  # the recorded hidden states entering layer ``start``
            hidden = [read_tensors(work / f"acts-{parity}" / f"b{b:05d}.safetensors")["h"]
                      for b in range(len(kwargs))] if activations_offload == "ram" else None
        else:
            hidden = [h for h, _ in captured]
            if activations_offload == "disk":
                for b, h in enumerate(hidden):
                    save_hidden(work / f"acts-{parity}", b, h)
                hidden = None
        del captured
        if activations_offload == "disk":
            inputs = DiskActivations(work, kwargs, parity)
        else:
            inputs = list(zip(hidden, kwargs))
            del hidden
        timings["capture"] = timings.get("capture", 0.0) + time.perf_counter() - t

    bar = tqdm(range(start, n_layers), desc=f"{solver.name} (streaming)", unit="layer",
               disable=not progress)
    try:
        for i in bar:
            t_layer = time.perf_counter()
            layer = layers[i]
            t = time.perf_counter()
            load_layer(skel, layer, f"{prefix}{i}.", files, by_layer.get(i, []), fusions)
            report.add_time("read", time.perf_counter() - t)
            report.masks = {}
            n_before = len(report.layers)
            if solver.needs_calibration:
                prune_layer(layer, i, adapter, solver, target, inputs, opts, report,
                            propagate=i + 1 < len(layers))
            else:
                from ..engine.calibrate import solve_linear_group

                with torch.no_grad():
                    for group in adapter.groups_of(layer):
                        solve_linear_group(layer, None, adapter, i, group, solver, None, target,
                                           report)
            t = time.perf_counter()
            state_dict = {f"{prefix}{i}.{k}": v for k, v in layer.state_dict().items()}
            names = [n for n in by_layer.get(i, []) if n in state_dict] + \
                [n for n in state_dict if n not in by_layer.get(i, [])]
            write_safetensors(work / "model" / f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors",
                              names, state_dict.__getitem__,
                              on_half_written=None if on_layer is None else
                              (lambda i=i: on_layer(i, "mid")))
            shapes = {f"{r.name}.weight": list(r.shape) for r in report.layers[n_before:]}
            masks = {f"{k}.weight": v for k, v in report.masks.items()}
            write_safetensors(work / "masks" / f"layer-{i:05d}.safetensors", list(masks),
                              masks.__getitem__, {"shapes": json.dumps(shapes)})
            if inputs is not None and i + 1 < len(layers):
                if isinstance(inputs, DiskActivations):
                    inputs.flip()
                else:
                    for b, (h, _) in enumerate(inputs):
                        save_hidden(work / f"acts-{(i + 1) % 2}", b, h)
            report.add_time("write", time.perf_counter() - t)
            del state_dict, masks
            to_meta(layer)
            state["completed"] = i
            state["layers"].extend({"name": r.name, "shape": list(r.shape), "pruned": r.pruned}
                                   for r in report.layers[n_before:])
            for k, v in report.timings.items():
                timings[k] = timings.get(k, 0.0) + v
            report.timings = {}
            layer_seconds.append(time.perf_counter() - t_layer)
            state["timings"] = timings
            write_json(work / "progress.json", state)
            if on_layer is not None:
                on_layer(i, "after")
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "allocate memory" not in str(exc):
            raise
        done = state["completed"]
        kept = f"layers 0-{done} are recorded in {work}" if done >= 0 else \
            f"the calibration setup is recorded in {work}"
        raise ResumableError(
            f"out of memory while pruning layer {done + 1} (estimated need "
            f"{gib(plan.total)}, see --max-memory); {kept}: free memory or raise the limit "
            "and rerun with --resume") from None
    bar.close()
    del inputs

    rows = [LinearReport(r["name"], tuple(r["shape"]), r["pruned"]) for r in state["layers"]]
    summary = Report(layers=rows, calib_dtype=str(calib_dtype or files.float_dtype())
                     if calib_info else None)
    meta = prune_meta(model_name, resolved, recipe, summary, calib_info, None,
                      {"prune": time.perf_counter() - t_start,
                       **{f"prune_{k}": v for k, v in timings.items()}})
    meta["streaming"] = {"activations_offload": activations_offload, "max_memory": max_memory,
                         "memory_plan": plan.as_dict(),
                         "layer_seconds_this_process": layer_seconds,
                         "resumed_after_layer": None if start == 0 else start - 1,
                         "run_id": state["run_id"]}
    if max_layers is not None and n_layers < len(layers):
        return meta  # a benchmark of the first layers: no checkpoint is assembled
    t = time.perf_counter()
    _assemble(work, src, out, files, outside_names, n_shards, len(layers), meta, export,
              export_dtype, max_shard_size, model_name, recipe, recipe_yaml, progress)
    meta["timings"]["save"] = time.perf_counter() - t
    return meta


def _assemble(work: Path, src: Path, out: Path, files: SafetensorsFiles, outside_names: list[str],
              n_shards: int, n_layers: int, meta: dict, export: str, export_dtype: str,
              max_shard_size, model_name: str, recipe, recipe_yaml: str | None,
              progress: bool) -> None:
    """Turn the work directory's layer shards into the finished checkpoint and rename it into
    place. Idempotent: a run killed here redoes it on ``--resume``."""
    model_dir = work / "model"
    last = model_dir / f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors"
    # copied byte for byte through a 16 MB buffer: an embedding matrix can be larger than a layer
    write_safetensors(last, outside_names, None, spec=_file_spec(files), copy_from=files)
    weight_map, total = {}, 0
    for k in range(1, n_shards + 1):
        shard = model_dir / f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        for name, (_, info, _) in SafetensorsFiles([shard]).entries.items():
            weight_map[name] = shard.name
            total += info["data_offsets"][1] - info["data_offsets"][0]
    write_json(model_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    # the masks of every layer in one file, as write_checkpoint writes it
    mask_files = [work / "masks" / f"layer-{i:05d}.safetensors" for i in range(n_layers)]
    mask_src = SafetensorsFiles(mask_files)
    shapes: dict[str, list] = {}
    for path in mask_files:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            shapes.update(json.loads(json.loads(f.read(n))["__metadata__"]["shapes"]))
    write_safetensors(model_dir / MASKS_FILE, list(mask_src.entries), mask_src.read,
                      {"llmprune_masks": "keep bits, little-endian, rows byte-padded",
                       "shapes": json.dumps(shapes)}, spec=_file_spec(mask_src))
    for path in sorted(src.iterdir()):
        if path.is_file() and not WEIGHT_FILE_RE.search(path.name) and \
                path.name not in (META_FILE, MASKS_FILE):
            shutil.copy2(path, model_dir / path.name)
    if recipe_yaml is None:
        from ..recipe import PruneRecipe
        from ..recipe import dump

        recipe_yaml = dump(model_name, PruneRecipe.from_dict(meta["recipe_resolved"]),
                           {"format": export, "dtype": export_dtype}
                           if (export, export_dtype) != ("dense", "auto") else None, None)
    (model_dir / "recipe.yaml").write_text(recipe_yaml)
    write_meta(model_dir, meta, durable=True)  # last: the dense checkpoint is complete
    final = model_dir
    if export != "dense" or export_dtype != "auto":
        from ..io.sources import dir_source
        from ..io.export import export as export_dir

        final = work / "export"
        shutil.rmtree(final, ignore_errors=True)
        final.mkdir()
        export_dir(dir_source(model_dir), final, export, export_dtype, max_shard_size, progress)
        (final / "recipe.yaml").write_text(recipe_yaml)
    publish_dir(final, out)
    shutil.rmtree(work, ignore_errors=True)


def _file_spec(files: SafetensorsFiles):
    def spec(name):
        info = files.entries[name][1]
        return info["dtype"], info["shape"]
    return spec
