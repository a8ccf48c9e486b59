"""Core benchmark (issue: the core), following ../shared/PROTOCOL.md.

For each solver and pattern it prunes smollm2-135m with llmprune and with the peer,
llm-compressor 0.14.0.1 (in its own virtual environment, eval/.peer-venv, made by
eval/peer_setup.sh), on the *same* calibration token ids: the first 32 non-overlapping windows of
512 tokens of WikiText-2 valid.txt, tokenized once as one text. Every run is a fresh subprocess,
so its peak RSS (ru_maxrss: load + prune) is its own. Both pruned models are then scored by the
same perplexity code: the first 16 windows of 1024 tokens of test.txt.

It also times the floor for sequential pruning: two dense forward passes of every decoder layer
over the same calibration batches, in float32 and in bfloat16. The machine is shared and its
speed drifts by 10% and more within minutes, so each solver run is also bracketed by two floor
runs in the dtype its forward passes used (one right before, one right after, fresh processes),
and ``ours/floor_adjacent`` divides by their mean.

    bash eval/bench_setup.sh      # llmprune's workers run in the README main command's install
    .venv/bin/python eval/bench_core.py                      # everything (about 30 minutes)
    .venv/bin/python eval/bench_core.py --solvers wanda --patterns 2:4 --skip-peer

Prints a table and writes eval/results/bench_core.json. Timings are wall-clock seconds of the
pruning call alone (loaded model -> pruned model); ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / "eval" / ".peer-venv" / "bin" / "python"
# The environment of the README's main command (`pip install -e .`, no test extras), made by
# eval/bench_setup.sh. The test extra adds triton (for the kernel tests), which torch._dynamo
# imports whenever it is installed: +110 MiB of peak RSS that a user's install does not have
# and the peer's environment does not have either.
BENCH_PY = ROOT / "eval" / ".bench-venv" / "bin" / "python"
NSAMPLES, SEQLEN = 32, 512
EVAL_SEQLEN, EVAL_WINDOWS = 1024, 16


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries ru_maxrss across
    fork+exec, so a worker started by this (large) driver would report the driver's peak."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


# ----------------------------------------------------------------------------- workers
def worker_ours(args) -> dict:
    import torch
    from safetensors.torch import load_file

    import llmprune
    from llmprune.loaders import load_model

    t = time.perf_counter()
    model, tok, _ = load_model(args.ckpt)
    load_s = time.perf_counter() - t
    ids = load_file(args.calib_ids)["input_ids"]
    sparsity, pattern = (None, args.pattern) if ":" in args.pattern else (float(args.pattern), None)
    recipe = llmprune.PruneRecipe(args.method, sparsity=sparsity, pattern=pattern,
                                  nsamples=ids.shape[0], seqlen=ids.shape[1],
                                  calib_dtype=args.calib_dtype, batch_size=args.batch_size,
                                  true_sequential=args.true_sequential)
    t = time.perf_counter()
    report = llmprune.prune(model, recipe, calib_ids=ids, progress=False)
    prune_s = time.perf_counter() - t
    rss_prune = peak_rss_mib()
    t = time.perf_counter()
    model.save_pretrained(args.output)
    tok.save_pretrained(args.output)
    return {"prune_seconds": prune_s, "load_seconds": load_s,
            "save_seconds": time.perf_counter() - t, "peak_rss_mib_after_prune": rss_prune,
            "peak_rss_mib": peak_rss_mib(), "sparsity": report.sparsity,
            "breakdown": report.timings, "torch_threads": torch.get_num_threads(),
            "forward_dtype": report.calib_dtype,
            "calib_dtype": args.calib_dtype, "true_sequential": args.true_sequential,
            "batch_size": args.batch_size}


def worker_floor(args) -> dict:
    """Two dense forward passes of each decoder layer over the calibration batches."""
    import torch
    from safetensors.torch import load_file

    from llmprune.engine.calibrate import EngineOptions, capture_inputs
    from llmprune.loaders import load_model
    from llmprune.models import adapter_for

    model, _, _ = load_model(args.ckpt)
    ids = load_file(args.calib_ids)["input_ids"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.calib_dtype]
    adapter = adapter_for(model)
    opts = EngineOptions(calib_dtype=dtype)
    with torch.no_grad():
        inputs = capture_inputs(model, adapter, ids, opts)
        t = time.perf_counter()
        for layer in adapter.layers(model):
            layer.to(dtype)
            for _ in range(2):
                outs = [layer(h, **kw) for h, kw in inputs]
            inputs = [(o[0] if isinstance(o, tuple) else o, kw) for o, (_, kw) in zip(outs, inputs)]
        seconds = time.perf_counter() - t
    return {"floor_seconds": seconds, "dtype": args.calib_dtype,
            "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver
def run_worker(cmd: list[str], json_path: Path) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(json_path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--solvers", default="sparsegpt,wanda,magnitude")
    ap.add_argument("--patterns", default="0.5,2:4")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--floor-dtypes", default="fp32,bf16",
                    help="dtypes of the once-per-run floor (the adjacent floors around each "
                         "solver run use the solver's own forward dtype); empty for none")
    ap.add_argument("--calib-dtype", default="auto", help="llmprune's --calib-dtype")
    ap.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                    help="llmprune's --true-sequential (its default) or --no-true-sequential")
    ap.add_argument("--batch-size", type=int, default=4, help="llmprune's --batch-size")
    ap.add_argument("--ours-python", help="python for llmprune's and the floor's workers "
                    "(default: eval/.bench-venv, made by eval/bench_setup.sh, if it exists, "
                    "else this one)")
    ap.add_argument("--json", default=str(ROOT / "eval" / "results" / "bench_core.json"))
    # worker mode (internal)
    ap.add_argument("--worker", choices=["ours", "floor"])
    ap.add_argument("--ckpt")
    ap.add_argument("--calib-ids")
    ap.add_argument("--method")
    ap.add_argument("--pattern")
    ap.add_argument("--output")
    ap.add_argument("--out-json")
    args = ap.parse_args()

    if args.worker:
        result = worker_ours(args) if args.worker == "ours" else worker_floor(args)
        Path(args.out_json).write_text(json.dumps(result, indent=2))
        return

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from llmprune.io.data import ids_sha256, load_text, tokenize, windows
    from llmprune.evaluate.ppl import perplexity
    from llmprune.loaders import load_model
    from llmprune.io.loading import smollm2_checkpoint

    ckpt = smollm2_checkpoint()
    model, tok, _ = load_model(str(ckpt))
    calib = windows(tokenize(tok, load_text("wikitext2", "calib").text), NSAMPLES, SEQLEN)
    test_ids = tokenize(tok, load_text("wikitext2", "eval").text)
    work = Path(tempfile.mkdtemp(prefix="llmprune-bench-"))
    calib_file = work / "calib_ids.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_file))

    def ppl_of(path_or_model) -> float:
        m = path_or_model
        if not isinstance(m, torch.nn.Module):
            m = AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
        return perplexity(m, test_ids, EVAL_SEQLEN, EVAL_WINDOWS, progress=False)

    results = {"protocol": {"model": "smollm2-135m", "calib": [NSAMPLES, SEQLEN],
                            "calib_ids_sha256": ids_sha256(calib),
                            "eval": [EVAL_WINDOWS, EVAL_SEQLEN]},
               "dense_perplexity": ppl_of(model), "floor": {}, "runs": []}
    del model
    print(f"dense perplexity {results['dense_perplexity']:.3f}", flush=True)

    ours_py = args.ours_python or (str(BENCH_PY) if BENCH_PY.exists() else sys.executable)
    results["ours_python"] = ours_py
    print(f"ours and the floor run in {ours_py}", flush=True)
    base = [ours_py, __file__, "--ckpt", str(ckpt), "--calib-ids", str(calib_file)]
    if not args.skip_floor:
        for dt in [d for d in args.floor_dtypes.split(",") if d]:
            out_json = work / f"floor-{dt}.json"
            results["floor"][dt] = run_worker(
                base + ["--worker", "floor", "--calib-dtype", dt, "--out-json", str(out_json)],
                out_json)["floor_seconds"]
            print(f"floor ({dt}, 2 dense passes): {results['floor'][dt]:.1f} s", flush=True)

    if not args.skip_peer:
        subprocess.run(["bash", str(ROOT / "eval" / "peer_setup.sh")], check=True)
    for method in args.solvers.split(","):
        for pattern in args.patterns.split(","):
            row = {"method": method, "pattern": pattern}
            out = work / f"ours-{method}-{pattern.replace(':', 'of')}"
            out_json = out.with_suffix(".json")
            cmd = base + ["--worker", "ours", "--method", method, "--pattern", pattern,
                          "--output", str(out), "--out-json", str(out_json),
                          "--calib-dtype", args.calib_dtype, "--batch-size", str(args.batch_size)]
            cmd.append("--true-sequential" if args.true_sequential else "--no-true-sequential")
            adjacent = not args.skip_floor and method != "magnitude"
            floor_dt = ("bf16" if args.calib_dtype == "bf16" else "fp32")
            if adjacent and args.calib_dtype == "auto":  # what auto picks here (a dry resolve)
                floor_dt = _auto_forward_dtype(method)
            floors = []
            if adjacent:
                floors.append(_floor(base, work, floor_dt))
            row["ours"] = run_worker(cmd, out_json)
            if adjacent:
                floors.append(_floor(base, work, floor_dt))
                row["floor_adjacent"] = {"dtype": floor_dt, "seconds": floors}
            row["ours"]["perplexity"] = ppl_of(out)
            if method != "magnitude" and not args.skip_peer:
                pout = work / f"peer-{method}-{pattern.replace(':', 'of')}"
                pjson = pout.with_suffix(".json")
                row["peer"] = run_worker(
                    [str(PEER_PY), str(ROOT / "eval" / "peer_llmcompressor.py"), "--model",
                     str(ckpt), "--calib-ids", str(calib_file), "--method", method,
                     "--sparsity", "0.5", "--mask-structure",
                     "2:4" if pattern == "2:4" else "0:0", "--output", str(pout),
                     "--json", str(pjson)], pjson)
                row["peer"]["perplexity"] = ppl_of(pout)
            results["runs"].append(row)
            print(json.dumps(_summary(row, results["floor"])), flush=True)
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    print()
    print(_table(results))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")


def _floor(base: list[str], work: Path, dtype: str) -> float:
    out_json = work / f"floor-adjacent-{dtype}.json"
    return run_worker(base + ["--worker", "floor", "--calib-dtype", dtype, "--out-json",
                              str(out_json)], out_json)["floor_seconds"]


def _auto_forward_dtype(method: str) -> str:
    """The dtype `--calib-dtype auto` gives ``method`` on this machine, for an fp32 model."""
    import torch

    from llmprune.core.device import bf16_is_fast
    from llmprune.solvers import get_solver

    wanted = get_solver(method).auto_calib_dtype
    return "bf16" if wanted == torch.bfloat16 and bf16_is_fast("cpu") else "fp32"


def _summary(row: dict, floor: dict) -> dict:
    o, p = row["ours"], row.get("peer")
    s = {"method": row["method"], "pattern": row["pattern"],
         "ours_s": round(o["prune_seconds"], 1), "ours_ppl": round(o["perplexity"], 3),
         "ours_rss_mib": round(o["peak_rss_mib"])}
    for dt, f in floor.items():
        s[f"ours/floor_{dt}"] = round(o["prune_seconds"] / f, 3)
    if "floor_adjacent" in row:
        fa = row["floor_adjacent"]
        s["ours/floor_adjacent"] = round(o["prune_seconds"] / (sum(fa["seconds"]) / 2), 3)
        s["floor_adjacent_dtype"] = fa["dtype"]
    if p:
        s.update(peer_s=round(p["prune_seconds"], 1), peer_ppl=round(p["perplexity"], 3),
                 peer_rss_mib=round(p["peak_rss_mib"]),
                 time_ratio=round(o["prune_seconds"] / p["prune_seconds"], 3))
    return s


def _table(results: dict) -> str:
    floor = results["floor"]
    head = ("| method | pattern | ours s | peer s | ours/peer | ours ppl | peer ppl | "
            "ours RSS MiB | peer RSS MiB | " + " | ".join(f"ours/floor {d}" for d in floor)
            + " | ours/floor adjacent |")
    lines = [head, "|" + "---|" * (10 + len(floor))]
    for row in results["runs"]:
        s = _summary(row, floor)
        lines.append("| " + " | ".join(str(s.get(k, "-")) for k in (
            "method", "pattern", "ours_s", "peer_s", "time_ratio", "ours_ppl", "peer_ppl",
            "ours_rss_mib", "peer_rss_mib")) + " | " + " | ".join(
            str(s.get(f"ours/floor_{d}", "-")) for d in floor) + " | "
            + (f"{s['ours/floor_adjacent']} ({s['floor_adjacent_dtype']})"
               if "ours/floor_adjacent" in s else "-") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
