"""Structured pruning on smollm2-135m: the one-shot baseline, Bonsai and LoRAPrune.

Issue 5, acceptance 1 (quality), 3 (Bonsai memory) and 4 (LoRAPrune memory):

* for 20% and 40% of decoder-layer parameters removed (uniform widths, query heads removed evenly
  within KV groups), test perplexity of
  - the one-shot baseline, ``structured.prune_structured`` with ``magnitude`` and ``activation``
    importance (the better one is the baseline of the table),
  - Bonsai (``llmprune.bonsai``), forward passes only,
  - LoRAPrune (``llmprune.loraprune``), LoRA fine-tuning on the calibration windows while pruning;
* Bonsai's peak RSS against the peak RSS of a dense evaluation forward pass with the same batch
  (the batch every Bonsai sub-model is evaluated on), each measured as VmHWM of its own fresh
  subprocess in the same run;
* LoRAPrune's trainable parameters and peak RSS.

Protocol (../shared/PROTOCOL.md): calibration windows are consecutive non-overlapping windows of
WikiText-2 valid.txt from token 0 (the same ids for every method); perplexity on test.txt, the
first 16 windows of 1024 tokens, of the **shrunk** model (weights physically sliced). The CPU is
shared, so the runs are scaled to a few minutes each (see CONFIG below; the figures state it):
the calibration windows are 256 tokens long, Bonsai's sub-models are each scored on one such
window, LoRAPrune fine-tunes for a fixed number of steps of one window. Every job is a fresh
subprocess with one torch thread (on this 2-core machine shared by other work, one thread is
3-4x faster than two); two jobs run at a time.

    .venv/bin/python eval/bench_structured.py                 # the table (~45 CPU-minutes)
    .venv/bin/python eval/bench_structured.py --jobs bonsai-0.2   # one job, printed as JSON
    .venv/bin/python eval/bench_structured.py --merge OUT.json    # fill the table from --jobs

Each Bonsai / LoRAPrune job costs about 5-8 CPU-minutes (one torch thread); on a CPU shared
with other work the wall time is several times that. The committed table was run as the full
driver plus two ``--jobs`` drivers in parallel, merged with ``--merge`` (see "notes" in the JSON).

Writes eval/results/bench_structured.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results" / "bench_structured.json"
SPARSITIES = (0.2, 0.4)
CONFIG = {
    "seqlen": 256,  # calibration window length (tokens)
    "prior_nsamples": 16,  # windows for the activation statistics (baseline and Bonsai's prior)
    "bonsai": {"iterations": 3, "samples": 40, "sub_nsamples": 1, "mlp_block": 64,
               "candidate_factor": 2.0, "drop_prob": 0.5, "ridge": 1.0, "batch_size": 1},
    "loraprune": {"nsamples": 64, "steps": 60, "batch_size": 1, "rank": 8, "alpha": 16.0,
                  "lr": 5e-4, "prune_steps": 4, "prune_until": 0.5, "ema": 0.9},
    "eval": {"seqlen": 1024, "windows": 16},
    "threads": 1,
}
if os.environ.get("BENCH_STRUCTURED_SMOKE"):  # a seconds-long check of the plumbing only
    CONFIG["bonsai"].update(iterations=1, samples=2)
    CONFIG["loraprune"].update(steps=2, prune_steps=1)
    CONFIG["eval"]["windows"] = 1
    CONFIG["prior_nsamples"] = 2


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


# ----------------------------------------------------------------------------- worker side
def _calib(tok, nsamples: int):
    from llmprune.io.data import load_text, tokenize, windows

    text = load_text("wikitext2", "calib")
    return windows(tokenize(tok, text.text), nsamples, CONFIG["seqlen"], source=text.source)


def _ppl(model, tok) -> float:
    from llmprune.io.data import load_text, tokenize
    from llmprune.evaluate.ppl import perplexity

    ids = tokenize(tok, load_text("wikitext2", "eval").text)
    return perplexity(model, ids, CONFIG["eval"]["seqlen"], CONFIG["eval"]["windows"],
                      progress=False)


def worker(job: str) -> dict:
    import torch

    torch.set_num_threads(CONFIG["threads"])
    from llmprune.loaders import load_model
    from llmprune.structured.shrink import removed_fraction, shrink_

    kind, _, arg = job.partition("-")
    model, tok, _ = load_model("smollm2-135m")
    out: dict = {"job": job}
    t = time.perf_counter()
    if kind == "denseforward":  # the reference for Bonsai's memory: one eval forward, same batch
        ids = _calib(tok, CONFIG["prior_nsamples"])[: CONFIG["bonsai"]["sub_nsamples"]]
        out["rss_before_mib"] = vm_hwm_mib()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        out["peak_rss_mib"] = vm_hwm_mib()
        out["batch"] = list(ids.shape)
        return out
    if kind == "dense":
        out["perplexity"] = _ppl(model, tok)
        return out
    sparsity = float(arg.split("-")[-1])
    if kind in ("magnitude", "activation"):
        from llmprune.structured.selection import prune_structured

        ids = _calib(tok, CONFIG["prior_nsamples"]) if kind == "activation" else None
        mask, _ = prune_structured(model, importance=kind, sparsity=sparsity, calib_ids=ids,
                                   batch_size=4, progress=False)
    elif kind == "bonsai":
        from llmprune.structured.bonsai import BonsaiConfig, Target, bonsai_mask

        ids = _calib(tok, CONFIG["prior_nsamples"])
        out["rss_before_mib"] = vm_hwm_mib()
        cfg = BonsaiConfig(Target(sparsity=sparsity), seed=0, **CONFIG["bonsai"])
        mask, info = bonsai_mask(model, ids, cfg, progress=False)
        out["peak_rss_mib"] = vm_hwm_mib()  # before the perplexity pass (its batch is 1x1024)
        out["info"] = info
    elif kind == "loraprune":
        from llmprune.structured.bonsai import Target
        from llmprune.structured.loraprune import LoRAPruneConfig, loraprune

        c = dict(CONFIG["loraprune"])
        ids = _calib(tok, c.pop("nsamples"))
        out["rss_before_mib"] = vm_hwm_mib()
        cfg = LoRAPruneConfig(Target(sparsity=sparsity), seed=0, **c)
        model, mask, info = loraprune(model, ids, cfg, progress=False)
        out["peak_rss_mib"] = vm_hwm_mib()
        info["loss_first_last"] = [info["losses"][0], info["losses"][-1]]
        del info["losses"]
        out["info"] = info
    else:
        raise SystemExit(f"unknown job {job}")
    out["seconds"] = time.perf_counter() - t
    out["removed_fraction"] = removed_fraction(model, mask)
    shrink_(model, mask)
    out["params_after"] = sum(p.numel() for p in model.parameters())
    out["perplexity"] = _ppl(model, tok)
    return out


# ----------------------------------------------------------------------------- driver
def run_job(job: str) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", job], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"job": job, "error": proc.stderr[-3000:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = time.perf_counter() - t
    print(f"done {job}: {json.dumps({k: v for k, v in res.items() if k != 'info'})}",
          file=sys.stderr, flush=True)
    return res


def table(results: dict) -> str:
    rows = ["| removed | baseline (magnitude) | baseline (activation) | Bonsai | LoRAPrune |",
            "|---|---|---|---|---|"]
    for s in SPARSITIES:
        cells = []
        for kind in ("magnitude", "activation", "bonsai", "loraprune"):
            r = results.get(f"{kind}-{s}", {})
            cells.append(f"{r['perplexity']:.2f} ({r['removed_fraction']:.3f})"
                         if "perplexity" in r else "not run")
        rows.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", default=None, help="comma-separated jobs (default: all)")
    ap.add_argument("--parallel", type=int, default=2, help="jobs at a time")
    ap.add_argument("--merge", default=None, metavar="JSON",
                    help="replace failed or missing runs of the written table by those of a "
                         "--jobs output (JSON) and write the table again")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker), default=str))
        return
    jobs = ["bonsai-0.4", "loraprune-0.4", "bonsai-0.2", "loraprune-0.2", "denseforward",
            "dense"] + [f"{k}-{s}" for s in SPARSITIES for k in ("magnitude", "activation")]
    if args.jobs:
        jobs = [j.strip() for j in args.jobs.split(",")]
    t = time.perf_counter()
    if args.merge:  # fill failed / missing jobs of the last table from a --jobs JSON output
        old = json.loads(RESULTS.read_text())
        results = old["runs"]
        for job, res in json.loads(Path(args.merge).read_text()).items():
            if "error" not in res and ("error" in results.get(job, {"error": 1})):
                results[job] = res
        summarize(results, old.get("config", CONFIG), old["wall_seconds"])
        return
    with ThreadPoolExecutor(args.parallel) as pool:
        results = {r["job"]: r for r in pool.map(run_job, jobs)}
    if args.jobs:
        print(json.dumps(results, indent=2, default=str))
        return
    summarize(results, CONFIG, time.perf_counter() - t)


def summarize(results: dict, config: dict, wall: float) -> None:
    summary = {"config": config, "wall_seconds": wall, "runs": results,
               "dense_perplexity": results.get("dense", {}).get("perplexity")}
    fwd = results.get("denseforward", {}).get("peak_rss_mib")
    for s in SPARSITIES:
        b = results[f"bonsai-{s}"]
        if fwd and "peak_rss_mib" in b:
            b["rss_ratio_vs_dense_forward"] = b["peak_rss_mib"] / fwd
        base = min((results.get(f"{k}-{s}", {}).get("perplexity", float("inf")), k)
                   for k in ("magnitude", "activation"))
        summary[f"baseline-{s}"] = {"importance": base[1], "perplexity": base[0]}
        for kind in ("bonsai", "loraprune"):
            summary[f"{kind}-{s}-beats-baseline"] = results[f"{kind}-{s}"].get(
                "perplexity", float("inf")) < base[0]
    summary["table"] = table(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"dense perplexity: {summary['dense_perplexity']}")
    print(summary["table"])
    for s in SPARSITIES:
        b, lp = results[f"bonsai-{s}"], results[f"loraprune-{s}"]
        print(f"{s:.0%}: Bonsai peak RSS {b.get('peak_rss_mib', float('nan')):.0f} MiB = "
              f"{b.get('rss_ratio_vs_dense_forward', float('nan')):.3f} x dense forward "
              f"({fwd} MiB); LoRAPrune peak RSS {lp.get('peak_rss_mib', float('nan')):.0f} MiB, "
              f"trainable {lp.get('info', {}).get('trainable_params')}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
