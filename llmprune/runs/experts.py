"""``llmprune experts``: load an MoE checkpoint, score its experts on calibration text, remove the
least salient ones in every layer and write a plain, smaller checkpoint atomically."""

from __future__ import annotations

import time

from ..core.errors import UserError
from ..io.meta import DENSE_FORMAT, write_meta
from ..structured.experts import (SALIENCIES, check_keep, expert_saliency, kept_count,
                                  kept_experts, moe_blocks, remove_experts)


def experts_checkpoint(model_name: str, output: str, *, keep_ratio: float, saliency: str = "reap",
                       nsamples: int = 32, seqlen: int = 512, calib_data: str | None = None,
                       calib_sampling: str = "consecutive", batch_size: int = 4, seed: int = 0,
                       overwrite: bool = False, eval_ppl: str | None = None,
                       eval_seqlen: int = 1024, eval_max_windows: int | None = 16,
                       trust_remote_code: bool = False, device: str = "cpu",
                       progress: bool = True) -> dict:
    """Whole-expert pruning of ``model_name`` to ``output``; returns the llmprune.json written."""
    from ..core.device import check_device, library_versions
    from ..evaluate.ppl import timed_perplexity
    from ..io.data import load_text, text_windows, tokenize
    from ..io.loading import resolve
    from ..io.output import atomic_dir, check_output
    from ..loaders import load_model

    if saliency not in SALIENCIES:
        raise UserError(f"--saliency must be one of {', '.join(SALIENCIES)}, got {saliency!r}")
    if not 0.0 < keep_ratio <= 1.0:
        raise UserError(f"--keep-ratio must be in (0, 1], got {keep_ratio}")
    check_device(device)
    out = check_output(output, overwrite)
    resolved = resolve(model_name)
    check_output(output, overwrite, sources=(resolved,))
    calib = load_text(calib_data, "calib")
    evaluation = load_text(eval_ppl, "eval") if eval_ppl else None

    def check(skeleton):  # before any weight is read
        _, n = moe_blocks(skeleton)
        check_keep(skeleton.config, n, kept_count(n, keep_ratio))

    timings = {}
    t = time.perf_counter()
    model, tokenizer, resolved = load_model(model_name, trust_remote_code=trust_remote_code,
                                            check=check)
    timings["load"] = time.perf_counter() - t
    model.to(device)
    ids, calib_info = text_windows(tokenizer, calib, nsamples, seqlen, calib_sampling, seed)
    results = {}
    eval_ids = tokenize(tokenizer, evaluation.text) if evaluation is not None else None
    if eval_ids is not None:
        results["dense_perplexity"], _ = timed_perplexity(
            model, eval_ids, eval_seqlen, eval_max_windows, device, progress, "dense perplexity")
    t = time.perf_counter()
    scores = expert_saliency(model, ids, batch_size, progress)
    keep, _ = kept_experts(scores[saliency], keep_ratio)
    summary = remove_experts(model, keep)
    timings["prune"] = time.perf_counter() - t
    if eval_ids is not None:
        results["pruned_perplexity"], _ = timed_perplexity(
            model, eval_ids, eval_seqlen, eval_max_windows, device, progress, "pruned perplexity")
    meta = {"format": DENSE_FORMAT, "format_version": 1, "method": "experts",
            "source_model": model_name, "resolved_model": resolved,
            "target": {"keep_ratio": keep_ratio, "saliency": saliency}, "experts": summary,
            "saliency": {k: [[round(float(x), 6) for x in s] for s in v]
                         for k, v in scores.items()},
            "calibration": dict(calib_info, sampling=calib_sampling),
            "eval": results or None, "loads_with": "AutoModelForCausalLM.from_pretrained",
            "versions": library_versions(), "timings": timings}
    with atomic_dir(out, overwrite) as tmp:
        model.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_meta(tmp, meta)
    return meta


__all__ = ["experts_checkpoint"]
