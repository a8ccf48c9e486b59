"""Perplexity, measured as the benchmark protocol states it.

The text is tokenized once as a whole and cut into consecutive non-overlapping windows of
``seqlen`` tokens starting at token 0; the first ``max_windows`` are used. Perplexity is
exp(mean next-token negative log-likelihood) over all predicted tokens (``seqlen - 1`` per window).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.errors import CorruptCheckpointError, DataError, NonFiniteError
from ..models.limits import check_seqlen


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of "
                        f"--seqlen {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 1024, max_windows: int | None = 16,
               batch_size: int = 1, device: str = "cpu", progress: bool = True) -> float:
    """Perplexity of ``model`` on token ids ``[n_tokens]``."""
    if getattr(model, "config", None) is not None:
        check_seqlen(model.config, seqlen, "--seqlen")
    wins = eval_windows(ids, seqlen, max_windows)
    nll = 0.0
    count = 0
    model.to(device)
    for batch in tqdm(wins.split(batch_size), desc="perplexity", unit="batch",
                      disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += batch[:, 1:].numel()
    if not math.isfinite(nll):
        raise NonFiniteError(f"the evaluation loss is {nll}: the model's logits are NaN or "
                             "infinite on this text, so perplexity is undefined; check the "
                             "weights (or evaluate in float32 if a half dtype overflows)")
    try:
        return math.exp(nll / count)
    except OverflowError:  # a finite mean loss above ~709 nats
        return math.inf


def timed_perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None, device: str,
                     progress: bool, label: str) -> tuple[float, float]:
    """:func:`perplexity`, printed as ``LABEL: value``, and the seconds it took."""
    t = time.perf_counter()
    value = perplexity(model, ids, seqlen, max_windows, device=device, progress=progress)
    print(f"{label}: {value:.4f}", flush=True)
    return value, time.perf_counter() - t


def record_eval(model_dir: str, results: dict) -> bool:
    """Merge evaluation ``results`` into ``model_dir/llmprune.json`` (key ``evaluations``, one
    entry per data set / task, newest wins) when the model is a local llmprune output."""
    from pathlib import Path

    from ..io.meta import read_meta, write_meta

    try:
        meta = read_meta(Path(model_dir)) if Path(model_dir).is_dir() else None
    except CorruptCheckpointError:
        return False
    if meta is None:
        return False
    evals = meta.setdefault("evaluations", {})
    if "perplexity" in results:
        p = results["perplexity"]
        evals[f"perplexity/{p['data']}/{p['seqlen']}x{p['windows']}"] = p
    for task, res in results.get("lm_eval", {}).get("results", {}).items():
        evals[f"lm_eval/{task}"] = {"results": res,
                                    "n-shot": results["lm_eval"].get("n-shot", {}).get(task),
                                    "limit": results["lm_eval"].get("limit"),
                                    "lm_eval_version": results["lm_eval"].get("lm_eval_version")}
    write_meta(Path(model_dir), meta)
    return True


def evaluate_loaded(model, tokenizer, *, ppl: str | None = None, seqlen: int = 1024,
                    max_windows: int | None = 16, batch_size: int = 1,
                    tasks: list[str] | None = None, limit: float | None = None,
                    num_fewshot: int | None = None, include_path: str | None = None,
                    device: str = "cpu", seed: int = 0, progress: bool = True,
                    text=None) -> dict:
    """Perplexity on ``ppl`` and/or lm-eval ``tasks`` for a loaded model; prints
    ``perplexity: <value>`` and the task table, returns the results (as llmprune.json keeps
    them). ``text`` is the already loaded evaluation text, when the caller read it early."""
    from ..io.data import load_text, tokenize

    results: dict = {}
    if ppl:
        text = text or load_text(ppl, "eval")
        ids = tokenize(tokenizer, text.text)
        value = perplexity(model, ids, seqlen, max_windows, batch_size, device,
                           progress=progress)
        windows = min(ids.numel() // seqlen, max_windows or ids.numel())
        protocol = f"{text.source}, {windows} windows x {seqlen} tokens, exp(mean next-token NLL)"
        results["perplexity"] = {"data": ppl, "value": value, "seqlen": seqlen,
                                 "windows": windows, "protocol": protocol}
        print(f"protocol: {protocol}")
        print(f"perplexity: {value:.4f}")
    if tasks:
        from .lmeval import markdown_table, run_tasks

        results["lm_eval"] = run_tasks(model, tokenizer, tasks, limit=limit,
                                       num_fewshot=num_fewshot, batch_size=batch_size,
                                       include_path=include_path, device=device, seed=seed)
        print(markdown_table(results["lm_eval"]))
    return results
