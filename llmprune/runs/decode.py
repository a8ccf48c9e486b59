"""Greedy decode speed on the CPU: the sparse kernels against the dense model, side by side.

``llmprune bench-decode MODEL`` and ``eval/bench_cpu_decode.py`` both time
:func:`tokens_per_second` on several loaded models, alternating round by round so that the load
of a shared machine falls on all of them alike, and compare medians.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..core.errors import UserError
from ..io.meta import is_compact, read_meta
from ..loaders import load_pretrained
from ..sparse.cpu import CPUSparseLinear, kernel_path


def tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """Greedy ``generate`` of exactly ``tokens`` new tokens after ``prompt [1, p]``: tokens per
    second of the whole call (the short prompt's prefill included)."""
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       pad_token_id=0)
        return tokens / (time.perf_counter() - start)


def alternate(models: dict[str, torch.nn.Module], prompt: torch.Tensor, tokens: int,
              rounds: int) -> dict[str, list[float]]:
    """Tokens per second of every model, ``rounds`` times, in turn (after one warm-up each)."""
    for model in models.values():
        tokens_per_second(model, prompt, 2)
    out: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            out[name].append(tokens_per_second(model, prompt, tokens))
    return out


def summary(speeds: dict[str, list[float]], sparse: tuple[str, ...]) -> dict:
    """Medians, the faster dense baseline and each sparse model's speed-up over it."""
    med = {name: statistics.median(v) for name, v in speeds.items()}
    dense = {n: s for n, s in med.items() if n not in sparse}
    baseline = max(dense, key=dense.get)
    return {"tokens_per_s": med, "runs": speeds, "baseline": baseline,
            "speedup": {n: med[n] / med[baseline] for n in sparse}}


def bench_compact(path: str | Path, tokens: int = 32, rounds: int = 3, fp32: bool = True,
                  prompt_len: int = 8) -> dict:
    """A bf16 compact export on its sparse CPU path against the same weights dense (bf16, and
    fp32 unless ``fp32=False``), under plain transformers."""
    src = Path(path).expanduser()
    if not src.is_dir() or not is_compact(src):
        raise UserError(f"{path} is not a compact llmprune export (make one with "
                        "'llmprune export DIR --format compact --dtype bf16')")
    if (read_meta(src) or {}).get("dtype") != "bfloat16":
        raise UserError(f"{path} is not stored in bf16; the CPU sparse kernels read bf16 exports: "
                        "re-export it with --dtype bf16")
    sparse = load_pretrained(src, sparse="cpu")
    if not any(isinstance(m, CPUSparseLinear) for m in sparse.modules()):
        raise UserError(f"{path} has no compact pruned linears to run sparse")
    models = {"sparse": sparse, "dense-bf16": load_pretrained(src, sparse="dense")}
    if fp32:
        models["dense-fp32"] = load_pretrained(src, sparse="dense", dtype=torch.float32)
    vocab = int(sparse.config.vocab_size)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    result = summary(alternate(models, prompt, tokens, rounds), ("sparse",))
    result.update(path=str(src), tokens=tokens, rounds=rounds, kernel=kernel_path(),
                  threads=torch.get_num_threads())
    return result
