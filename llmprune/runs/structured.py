"""The run every structured command shares (the one-shot baseline, Bonsai, LoRAPrune): check the
inputs, load, calibrate, prune, evaluate, shrink and save atomically."""

from __future__ import annotations

from dataclasses import asdict

from ..core.errors import UserError
from ..evaluate.ppl import timed_perplexity
from ..structured.bonsai import BonsaiConfig, bonsai_mask
from ..structured.format import save_structured
from ..structured.loraprune import LoRAPruneConfig, check_8bit, loraprune
from ..structured.selection import IMPORTANCES, check_family, check_targets, prune_structured
from ..structured.shrink import layer_groups, masked


def run_checkpoint(method: str, model_name: str, output: str, prune_fn, *, target: dict,
                   nsamples: int, seqlen: int, calib_data: str | None = None,
                   calib_sampling: str = "consecutive", seed: int = 0, needs_calib: bool = True,
                   overwrite: bool = False, eval_ppl: str | None = None, eval_seqlen: int = 1024,
                   eval_max_windows: int | None = 16, trust_remote_code: bool = False,
                   device: str = "cpu", progress: bool = True, settings: dict | None = None,
                   before_load=None, check=None, extra_meta: dict | None = None) -> dict:
    """The run every structured command shares (baseline, Bonsai, LoRAPrune): check every input
    before the model is loaded, load, read calibration windows (when ``needs_calib``),
    (evaluate,) ``prune_fn(model, ids) -> (model, mask, info)``, (evaluate the masked model,)
    shrink and save atomically with :func:`save_structured`. Returns the llmprune.json written."""
    import time

    from ..core.device import check_device, library_versions
    from ..io.data import load_text, text_windows, tokenize
    from ..loaders import load_model
    from ..io.loading import resolve
    from ..io.output import check_output

    check_device(device)
    if before_load is not None:
        before_load()
    check_output(output, overwrite)
    resolved = resolve(model_name)
    check_output(output, overwrite, sources=(resolved,))
    calib_text = load_text(calib_data, "calib") if needs_calib else None
    eval_text = load_text(eval_ppl, "eval") if eval_ppl else None
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tokenizer, resolved = load_model(model_name, trust_remote_code=trust_remote_code,
                                            check=check or layer_groups)
    timings["load"] = time.perf_counter() - t
    model.to(device)
    ids, calib_info = None, None
    if calib_text is not None:
        ids, calib_info = text_windows(tokenizer, calib_text, nsamples, seqlen, calib_sampling,
                                       seed)
        calib_info["sampling"] = calib_sampling
        ids = ids.to(device)
    results: dict[str, float] = {}
    eval_ids = tokenize(tokenizer, eval_text.text) if eval_text is not None else None
    if eval_ids is not None:
        results["dense_perplexity"], _ = timed_perplexity(
            model, eval_ids, eval_seqlen, eval_max_windows, device, progress, "dense perplexity")
    t = time.perf_counter()
    model, mask, info = prune_fn(model, ids)
    timings["prune"] = time.perf_counter() - t  # seconds: load, prune (saving is not included)
    if eval_ids is not None:
        with masked(model, mask):
            results["pruned_perplexity"], _ = timed_perplexity(
                model, eval_ids, eval_seqlen, eval_max_windows, device, progress,
                "pruned perplexity")
    meta = {"method": method, **(extra_meta or {}), "source_model": model_name,
            "resolved_model": resolved,
            "target": {**target, "per_kind": info.get("per_kind_target")},
            "settings": settings or {}, "calibration": calib_info, "report": info,
            "results": results, "versions": library_versions(), "timings": timings}
    return save_structured(model.cpu(), tokenizer, output, mask, meta, overwrite=overwrite)


def _family_check(config: BonsaiConfig | LoRAPruneConfig):
    """The check of the weightless model: the family can do what the target asks
    (:func:`check_family`)."""
    return lambda skeleton: check_family(skeleton, heads=config.target.heads,
                                         sparsity=config.target.sparsity, uniform=config.uniform)


def structured_checkpoint(model_name: str, output: str, *, importance: str = IMPORTANCES[0],
                          sparsity: float | None = None, heads: float | None = None,
                          mlp: float | None = None, uniform: bool = True, gqa: str = "even",
                          nsamples: int = 32, seqlen: int = 512, calib_data: str | None = None,
                          batch_size: int = 4, overwrite: bool = False,
                          eval_ppl: str | None = None, eval_seqlen: int = 1024,
                          eval_max_windows: int | None = 16, trust_remote_code: bool = False,
                          device: str = "cpu", progress: bool = True) -> dict:
    """``llmprune structured``: load, score, select, (evaluate,) shrink and save atomically."""
    if importance not in IMPORTANCES:
        raise UserError(f"--importance must be magnitude or activation, got {importance!r}")
    check_targets(sparsity=sparsity, heads=heads, mlp=mlp, gqa=gqa)

    def prune_fn(model, ids):
        mask, summary = prune_structured(model, importance=importance, sparsity=sparsity,
                                         heads=heads, mlp=mlp, uniform=uniform, gqa=gqa,
                                         calib_ids=ids, batch_size=batch_size,
                                         progress=progress)
        return model, mask, summary

    return run_checkpoint(
        "structured-baseline", model_name, output, prune_fn,
        target={"sparsity": sparsity, "heads": heads, "mlp": mlp, "uniform": uniform, "gqa": gqa},
        nsamples=nsamples, seqlen=seqlen, calib_data=calib_data,
        needs_calib=importance == "activation", overwrite=overwrite, eval_ppl=eval_ppl,
        eval_seqlen=eval_seqlen, eval_max_windows=eval_max_windows,
        trust_remote_code=trust_remote_code, device=device, progress=progress,
        check=lambda skeleton: check_family(skeleton, heads=heads, sparsity=sparsity,
                                            uniform=uniform),
        extra_meta={"importance": importance},
        settings={"batch_size": batch_size})


def bonsai_checkpoint(model_name: str, output: str, config: BonsaiConfig, *, nsamples: int = 32,
                      seqlen: int = 512, calib_data: str | None = None,
                      calib_sampling: str = "consecutive", overwrite: bool = False,
                      eval_ppl: str | None = None, eval_seqlen: int = 1024,
                      eval_max_windows: int | None = 16, trust_remote_code: bool = False,
                      device: str = "cpu", progress: bool = True) -> dict:
    """``llmprune bonsai``: Bonsai on a checkpoint, the shrunk model written to ``output``.
    Returns the llmprune.json written."""
    if config.sub_nsamples > nsamples:
        raise UserError(f"--sub-nsamples {config.sub_nsamples} exceeds --nsamples {nsamples}")

    def prune_fn(model, ids):
        mask, info = bonsai_mask(model, ids, config, progress=progress)
        return model, mask, info

    return run_checkpoint("bonsai", model_name, output, prune_fn, target=asdict(config.target),
                          nsamples=nsamples, seqlen=seqlen, calib_data=calib_data,
                          calib_sampling=calib_sampling, seed=config.seed, overwrite=overwrite,
                          eval_ppl=eval_ppl, eval_seqlen=eval_seqlen,
                          eval_max_windows=eval_max_windows,
                          trust_remote_code=trust_remote_code, device=device, progress=progress,
                          settings={k: v for k, v in asdict(config).items() if k != "target"},
                          check=_family_check(config))


def loraprune_checkpoint(model_name: str, output: str, config: LoRAPruneConfig, *,
                         nsamples: int = 32, seqlen: int = 512, calib_data: str | None = None,
                         calib_sampling: str = "consecutive", overwrite: bool = False,
                         eval_ppl: str | None = None, eval_seqlen: int = 1024,
                         eval_max_windows: int | None = 16, trust_remote_code: bool = False,
                         device: str = "cpu", progress: bool = True) -> dict:
    """``llmprune loraprune``: LoRAPrune on a checkpoint; the merged, shrunk model is written to
    ``output``. Returns the llmprune.json written (with trainable parameters and peak RSS)."""
    def before_load():
        if config.load_8bit:
            check_8bit(device)
            raise UserError("--load-8bit: the 8-bit base path is not implemented in this "
                            "version (it needs a CUDA GPU to be tested); run without it")

    def prune_fn(model, ids):
        merged, mask, info = loraprune(model, ids, config, device=device, progress=progress)
        print(f"trainable parameters: {info['trainable_params']:,} of {info['total_params']:,}; "
              f"peak RSS {info['peak_rss_mib']:.0f} MiB", flush=True)
        return merged, mask, info

    return run_checkpoint("loraprune", model_name, output, prune_fn,
                          target=asdict(config.target),
                          nsamples=nsamples, seqlen=seqlen, calib_data=calib_data,
                          calib_sampling=calib_sampling, seed=config.seed, overwrite=overwrite,
                          eval_ppl=eval_ppl, eval_seqlen=eval_seqlen,
                          eval_max_windows=eval_max_windows,
                          trust_remote_code=trust_remote_code, device=device, progress=progress,
                          settings={k: v for k, v in asdict(config).items() if k != "target"},
                          before_load=before_load, check=_family_check(config))
