"""Quality on every tiny model family (issue 22): the best one-shot recipes' solver against
SparseGPT at the same target, on the tiny random models of tests/tiny_families.py.

Tiny random models have no meaningful perplexity, so the measure is how far the pruned model's
next-token distribution moves from the dense one's: the mean KL(dense || pruned) per token on
held-out random token ids (calibration: 8 x 64 random ids, seed 0; evaluation: 8 x 64 other
ones, seed 1). Each family and target runs SparseGPT and the solver stage of
recipes/smollm2-135m/best-2of4.yaml (N:M targets) or best-70.yaml (unstructured targets, its
sparsity replaced), with the calibration size above. A row is "ok" when the new method's KL is
at most SparseGPT's (1% tolerance for rounding). For unstructured targets, whose recipe also
sets OWL allocation, two more runs separate the solver from the allocation: SparseGPT under
the recipe's allocation, and the recipe's solver with uniform allocation; "solver_ok" holds when
the solver is no worse than SparseGPT under each allocation.

    .venv/bin/python eval/bench_quality_families.py                      # all types, ~5 minutes
    .venv/bin/python eval/bench_quality_families.py --types llama,opt --targets 2:4

Prints a markdown table and writes eval/results/bench_quality_families.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from eval.bench_quality import best_stage, split_target  # noqa: E402
from tests.tiny_families import KEYS, VOCAB, tiny_family_model  # noqa: E402

NSAMPLES, SEQLEN = 8, 64
TOLERANCE = 1.01


def kl_to_dense(dense_logits: torch.Tensor, model, ids: torch.Tensor) -> float:
    """Mean over tokens of KL(dense || model) of the next-token distributions."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    p = F.log_softmax(dense_logits, -1)
    q = F.log_softmax(logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def prune(model_type: str, solver: str, keys: dict, target: str, calib: torch.Tensor):
    import llmprune
    from llmprune.recipe import PruneRecipe

    keys = dict(keys, nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=NSAMPLES)
    sparsity, pattern = split_target(target)
    if pattern:
        keys["pattern"] = pattern
        keys.pop("allocation", None)
    else:
        keys["sparsity"] = sparsity
    model = tiny_family_model(model_type)
    t = time.perf_counter()
    llmprune.prune(model, PruneRecipe.from_stage(solver, keys), calib_ids=calib, progress=False)
    return model, time.perf_counter() - t


def no_worse(row: dict, ours: str, theirs: str) -> bool | None:
    """KL of ``ours`` at most ``theirs`` (1% tolerance); None when either did not run."""
    if not all(isinstance(row.get(k), float) for k in (ours, theirs)):
        return None
    return row[ours] <= row[theirs] * TOLERANCE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(KEYS))
    ap.add_argument("--targets", default="2:4,0.7")
    ap.add_argument("--json", default=str(ROOT / "eval" / "results" /
                                          "bench_quality_families.json"))
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    calib = torch.randint(3, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))
    test = torch.randint(3, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(1))
    rows = []
    for model_type in args.types.split(","):
        dense = tiny_family_model(model_type)
        with torch.no_grad():
            dense_logits = dense(input_ids=test, use_cache=False).logits.float()
        for target in args.targets.split(","):
            row = {"type": model_type, "target": target}
            solver, keys = best_stage(target)
            alloc = {k: v for k, v in keys.items() if k == "allocation" or k.startswith("owl")}
            runs = {"sparsegpt": ("sparsegpt", {}), "best": (solver, keys)}
            if alloc and not split_target(target)[1]:
                # the solver alone, each allocation against SparseGPT under the same one
                runs["sparsegpt_alloc"] = ("sparsegpt", alloc)
                runs["solver_uniform"] = (solver, {k: v for k, v in keys.items()
                                                   if k not in alloc})
            for label, (name, opts) in runs.items():
                try:
                    model, seconds = prune(model_type, name, opts, target, calib)
                    row[label] = kl_to_dense(dense_logits, model, test)
                except Exception as exc:  # a family a solver or pattern does not apply to
                    row[label] = f"{type(exc).__name__}: {str(exc)[:80]}"
            row["ok"] = no_worse(row, "best", "sparsegpt")
            if "sparsegpt_alloc" in row:
                row["solver_ok"] = (no_worse(row, "best", "sparsegpt_alloc")
                                    and no_worse(row, "solver_uniform", "sparsegpt"))
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    cols = ("sparsegpt", "best", "sparsegpt_alloc", "solver_uniform")
    print("| type | target | KL sparsegpt | KL best | KL sparsegpt, best's allocation "
          "| KL best's solver, uniform | best <= sparsegpt | solver <= sparsegpt, same "
          "allocation |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                 for k in cols]
        print(f"| {r['type']} | {r['target']} | {' | '.join(cells)} | {r['ok']} "
              f"| {r.get('solver_ok', r['ok'])} |")
    for key, what in (("ok", "best no worse than uniform SparseGPT"),
                      ("solver_ok", "the solver no worse than SparseGPT under the same "
                       "allocation")):
        ok = [r.get(key, r["ok"]) for r in rows if r.get(key, r["ok"]) is not None]
        print(f"{sum(ok)} of {len(ok)} comparable rows: {what}")

if __name__ == "__main__":
    main()
