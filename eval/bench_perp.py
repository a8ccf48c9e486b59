"""PERP on smollm2-135m: perplexity before and after retraining a tiny subset of parameters.

Issue 6, acceptance 1 and 2. Protocol (../shared/PROTOCOL.md): pruning calibrates on the first
32 x 512 windows of WikiText-2 valid.txt; perplexity is on the first 16 x 1024 windows of
test.txt. For magnitude 50%, Wanda 2:4 and SparseGPT 2:4 the script prunes a fresh copy of the
dense model through ``llmprune.prune``, measures perplexity, runs ``llmprune.perp.perp`` (norms +
MaskLoRA on every pruned linear, <= 0.5% of the parameters) on windows of valid.txt, measures
perplexity again, and checks the sparsity on the real model: every pruned linear's zero pattern
before == after (perp checks it too) and no nonzero outside the keep mask. Results are written
after every model to eval/results/bench_perp.json, and a markdown table is printed.

    .venv/bin/python eval/bench_perp.py --threads 1
    .venv/bin/python eval/bench_perp.py --methods magnitude --steps 60   # one model, longer

The dense perplexity (19.887) and SparseGPT 50% (31.48) are the figures measured on this protocol
before (README / eval/results/sweep-smollm2-135m); pass --measure-reference to measure both here.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune import PruneRecipe, prune  # noqa: E402
from llmprune.io.data import calibration_ids  # noqa: E402
from llmprune.core.bits import count_true, unpack_bits  # noqa: E402
from llmprune.io.data import load_text, tokenize, windows  # noqa: E402
from llmprune.evaluate.ppl import perplexity  # noqa: E402
from llmprune.loaders import load_model  # noqa: E402
from llmprune.retrain.perp import PerpConfig, perp  # noqa: E402

RUNS = {"magnitude": ("magnitude", 0.5, None), "wanda": ("wanda", None, "2:4"),
        "sparsegpt": ("sparsegpt", None, "2:4")}
DENSE_PPL = 19.887   # dense smollm2-135m on this protocol
SG50_PPL = 31.48     # llmprune sparsegpt --sparsity 0.5 on this protocol


def check_sparsity(model, masks) -> dict:
    """Independent of perp's own check: no nonzero where the mask says pruned, and the number of
    zeros per linear equals the number of pruned positions (when the pruned model had no kept
    zeros)."""
    mods = dict(model.named_modules())
    pruned = outside = 0
    for name, bits in masks.items():
        w = mods[name].weight.detach()
        keep = unpack_bits(bits, w.shape[1]).view(w.shape)
        outside += count_true((w != 0) & ~keep)
        pruned += count_true(~keep)
    total = sum(mods[n].weight.numel() for n in masks)
    return {"linears": len(masks), "pruned": pruned, "nonzero_outside_mask": outside,
            "sparsity": pruned / total}


def table(result: dict) -> str:
    lines = [f"dense ppl {result['dense_ppl']:.3f}; SparseGPT 50% ppl "
             f"{result['sparsegpt50_ppl']:.2f}"
             f"{' (measured here)' if result['reference_measured'] else ' (earlier run)'}",
             "", "| method | pattern | ppl before | ppl after PERP | trainable % | "
             "train seconds | sparsity exact |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['ppl_before']:.2f} | "
                     f"{r['ppl_after']:.2f} | {r['trainable_percent']:.3f} | "
                     f"{r['train_seconds']:.0f} | {r['sparsity_exact']} |")
    for r in result["runs"]:
        if "gap_to_sparsegpt50_closed" in r:
            lines.append(f"\nmagnitude + PERP closes {100 * r['gap_to_sparsegpt50_closed']:.1f}% "
                         "of the gap to SparseGPT 50%: (before - after) / (before - sg50)")
    return "\n".join(lines)


def merge(paths: list[str], output: str) -> int:
    """Combine the runs of several result files (e.g. methods run as parallel processes)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    result = dict(parts[0])
    result["runs"] = [r for part in parts for r in part["runs"]]
    result["command"] = [part["command"] for part in parts]
    result["merged_from"] = paths
    result["table"] = table(result)
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--train", default="norms,lora")
    ap.add_argument("--lora-variant", default="masklora")
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=64,
                    help="training windows of valid.txt (64 x 256 = the 32 x 512 calibration "
                         "tokens)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 when the machine is shared")
    ap.add_argument("--measure-reference", action="store_true",
                    help="also measure dense and SparseGPT 50%% perplexity in this run")
    ap.add_argument("--output", default=str(ROOT / "eval" / "results" / "bench_perp.json"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in --output and run only the missing methods")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only combine the runs of these result files into --output")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.output)
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    dense, tok, _ = load_model("smollm2-135m")
    load_s = time.perf_counter() - t
    recipe_base = dict(nsamples=32, seqlen=512)
    calib, calib_info = calibration_ids(tok, PruneRecipe("wanda", sparsity=0.5, **recipe_base))
    eval_ids = tokenize(tok, load_text("wikitext2", "eval").text)
    train_ids = windows(tokenize(tok, load_text("wikitext2", "calib").text), args.nsamples,
                        args.seqlen)
    config = PerpConfig(train=args.train, lora_variant=args.lora_variant, rank=args.rank,
                        alpha=args.alpha, steps=args.steps, lr=args.lr,
                        batch_size=args.batch_size, seqlen=args.seqlen, nsamples=args.nsamples,
                        dtype="fp32")
    result = {
        "command": "python " + " ".join(sys.argv),
        "protocol": "prune: 32 x 512 windows of wikitext-2 valid.txt; ppl: 16 x 1024 windows of "
                    "test.txt; PERP training: the first nsamples x seqlen windows of valid.txt",
        "perp_config": config.to_dict(),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "calibration": calib_info,
        "load_seconds": load_s,
        "dense_ppl": DENSE_PPL, "sparsegpt50_ppl": SG50_PPL, "reference_measured": False,
        "runs": [],
    }
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.resume and out_path.exists():
        old = json.loads(out_path.read_text())
        result["runs"] = old["runs"]
        result["earlier_commands"] = old.get("earlier_commands", []) + [old["command"]]

    def save():
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    def ppl(model):
        return perplexity(model, eval_ids, 1024, 16, progress=False)

    if args.measure_reference:
        result["dense_ppl"] = ppl(dense)
        sg = copy.deepcopy(dense)
        prune(sg, PruneRecipe("sparsegpt", sparsity=0.5, **recipe_base), calib_ids=calib,
              progress=False)
        result["sparsegpt50_ppl"] = ppl(sg)
        result["reference_measured"] = True
        del sg
        save()

    done = {r["method"] for r in result["runs"]}
    for key in args.methods.split(","):
        method, sparsity, pattern = RUNS[key]
        if method in done:
            continue
        model = copy.deepcopy(dense)
        recipe = PruneRecipe(method, sparsity=sparsity, pattern=pattern, **recipe_base)
        row = {"method": method, "pattern": pattern or f"{sparsity:.0%} unstructured"}
        t = time.perf_counter()
        report = prune(model, recipe, calib_ids=calib, keep_masks=True, progress=False)
        row["prune_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        row["ppl_before"] = ppl(model)
        row["eval_seconds"] = time.perf_counter() - t
        print(f"{method} {row['pattern']}: ppl before PERP {row['ppl_before']:.3f}", flush=True)
        row["sparsity_before"] = check_sparsity(model, report.masks)
        t = time.perf_counter()
        model, rep = perp(model, report.masks, config, train_ids=train_ids, progress=True)
        row["perp_wall_seconds"] = time.perf_counter() - t  # train + prepare + merge + check
        row["train_seconds"] = rep.seconds
        row["perp"] = rep.to_dict()
        row["trainable_percent"] = 100 * rep.trainable_fraction
        row["sparsity_after"] = check_sparsity(model, report.masks)
        row["sparsity_exact"] = (row["sparsity_after"] == row["sparsity_before"]
                                 and row["sparsity_after"]["nonzero_outside_mask"] == 0)
        row["ppl_after"] = ppl(model)
        print(f"{method} {row['pattern']}: ppl after PERP {row['ppl_after']:.3f} "
              f"({row['trainable_percent']:.3f}% trainable, {rep.seconds:.0f} s training, "
              f"loss {row['perp']['loss_first']:.3f} -> {row['perp']['loss_last']:.3f}, "
              f"sparsity exact: {row['sparsity_exact']})", flush=True)
        if method == "magnitude":
            gap = row["ppl_before"] - result["sparsegpt50_ppl"]
            row["gap_to_sparsegpt50_closed"] = (row["ppl_before"] - row["ppl_after"]) / gap
        result["runs"].append(row)
        save()
        del model

    result["table"] = table(result)
    save()
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
