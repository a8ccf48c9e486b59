"""Memory benchmark of the streaming engine (issue 8): prune a synthetic ~3B-parameter Llama
checkpoint (random bf16 weights, sharded safetensors, ~6 GB on disk) in a process whose address
space is limited to 3 GiB, and report peak RSS against the engine's own estimate.

    .venv/bin/python eval/bench_stream.py                      # build once, wanda + sparsegpt
    .venv/bin/python eval/bench_stream.py --methods wanda --layers 4

The checkpoint is built once into eval/.cache/synthetic-3b (git-ignored), tensor by tensor from a
fixed seed (never the whole model in RAM): hidden 3072, intermediate 8192, 28 layers, 24 heads /
8 KV heads, SmolLM2's tokenizer and vocabulary (49152), untied lm_head, weights N(0, 0.02^2).
Each method runs in a child process under ``prlimit --as=LIMIT`` (RLIMIT_AS: memory cgroups are
not writable on this machine), with one torch thread (the machine is shared). Calibration is
2 x 128 tokens of WikiText-2 valid.txt. ``--layers N`` prunes only the first N of the 28 layers
(every layer has the same shapes, so the memory peak is the same); the output says how many.
Writes eval/results/bench_stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "synthetic-3b"
SHAPE = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
             num_attention_heads=24, num_key_value_heads=8, vocab_size=49152,
             max_position_embeddings=4096, tie_word_embeddings=False)


def build(path: Path, shard_bytes: int = 2 * 10**9) -> None:
    import torch
    from transformers import LlamaConfig

    from llmprune.io.loading import smollm2_checkpoint, skeleton
    from llmprune.io.safetensors import write_safetensors

    if (path / "config.json").exists():
        return
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**SHAPE, dtype="bfloat16")
    skel = skeleton(config)
    specs = {n: tuple(t.shape) for n, t in skel.state_dict().items()}
    shards, cur, size = [], [], 0
    for name, shape in specs.items():
        n = 2
        for d in shape:
            n *= d
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    shards.append(cur)

    def make(name):  # deterministic per tensor, whatever the order
        shape = specs[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map = {}
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / fname, names, make,
                          spec=lambda n: ("BF16", list(specs[n])))
        weight_map.update({n: fname for n in names})
        print(f"built shard {k}/{len(shards)}", flush=True)
    total = sum(2 * torch.Size(s).numel() for s in specs.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    src = smollm2_checkpoint()
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(f, tmp / f.name)
    os.replace(tmp, path)


def vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    from llmprune.recipe import PruneRecipe
    from llmprune.runs.streaming import prune_streaming

    recipe = PruneRecipe(args.child, sparsity=0.5, nsamples=2, seqlen=128, batch_size=2)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f"{out.name}.partial", ignore_errors=True)
    t = time.perf_counter()
    meta = prune_streaming(str(CACHE), recipe, str(out), overwrite=True, progress=False,
                           max_layers=args.layers, activations_offload=args.offload,
                           max_memory=args.limit)
    wall = time.perf_counter() - t
    print("RESULT " + json.dumps({"peak_rss": vm("VmHWM"), "peak_vm": vm("VmPeak"),
                                  "wall_s": wall, "meta": meta}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="wanda,sparsegpt", help="comma list of methods")
    ap.add_argument("--layers", type=int, default=None,
                    help="prune only the first N of the 28 layers (same per-layer memory)")
    ap.add_argument("--limit", default="3GiB", help="RLIMIT_AS of the pruning process")
    ap.add_argument("--offload", choices=["ram", "disk"], default="ram",
                    help="--activations-offload of the runs")
    ap.add_argument("--build-only", action="store_true", help="only build the checkpoint")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    t = time.perf_counter()
    build(CACHE)
    print(f"checkpoint ready in {time.perf_counter() - t:.0f} s: {CACHE}", flush=True)
    if args.build_only:
        return
    disk = sum(f.stat().st_size for f in CACHE.glob("*.safetensors"))
    from llmprune.io.safetensors import SafetensorsFiles, checkpoint_files

    files = SafetensorsFiles(checkpoint_files(CACHE))
    params = sum(int(__import__("math").prod(files.shape(n))) for n in files.entries)
    results = {"model": {"path": str(CACHE.relative_to(ROOT.parent)), **SHAPE,
                         "parameters": params, "bytes_on_disk": disk, "dtype": "bfloat16"},
               "limit": "prlimit --as=LIMIT (RLIMIT_AS, address space; about 0.7 GiB of it "
                        "is torch's and triton's mapped libraries), --max-memory LIMIT",
               "threads": "torch.set_num_threads(1), OMP_NUM_THREADS=1 (shared 2-core machine)",
               "calibration": "2 x 128 tokens, WikiText-2 valid.txt", "runs": {}}
    from llmprune.io.shards import parse_size

    limit = parse_size(args.limit)
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        out = ROOT / ".cache" / f"bench-stream-{method}"
        cmd = ["prlimit", f"--as={limit}", "--", sys.executable, __file__, "--child", method,
               "--out", str(out), "--offload", args.offload, "--limit", args.limit]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            results["runs"][f"{method}@{args.limit}"] = {
                "failed": True, "returncode": proc.returncode, "limit": args.limit,
                "layers_requested": args.layers, "wall_s": wall,
                "stderr_tail": proc.stderr[-1500:]}
            continue
        res = json.loads(line[len("RESULT "):])
        meta = res["meta"]
        plan = meta["streaming"]["memory_plan"]
        # what the issue names: largest layer + activations + solver statistics (+ the float32
        # working copies the solver needs), and the process itself before any weight is read
        estimate = plan["layer_phase"]
        # the formula, without the solver's working memory
        formula = plan["layer"] + plan["activations"] + plan["stats"]
        layer_s = meta["streaming"]["layer_seconds_this_process"]
        run = {"limit": args.limit, "layers_pruned": len(layer_s),
               "layers_total": SHAPE["num_hidden_layers"],
               "peak_rss_bytes": res["peak_rss"], "peak_address_space_bytes": res["peak_vm"],
               "estimate_bytes": estimate, "process_base_bytes": plan["base"],
               "memory_plan": plan,
               "ratio_peak_to_estimate": res["peak_rss"] / estimate,
               "ratio_peak_minus_base_to_estimate": (res["peak_rss"] - plan["base"]) / estimate,
               "formula_bytes": formula,
               "ratio_peak_to_formula": res["peak_rss"] / formula,
               "ratio_peak_minus_base_to_formula": (res["peak_rss"] - plan["base"]) / formula,
               "wall_s": wall, "prune_s": res["wall_s"],
               "seconds_per_layer": layer_s, "mean_seconds_per_layer": sum(layer_s) / len(layer_s),
               "sparsity": meta["sparsity"], "timings": meta["timings"]}
        results["runs"][f"{method}@{args.limit}"] = run
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f"{out.name}.partial", ignore_errors=True)
        gib = 2**30
        print(f"{method}: {run['layers_pruned']}/{run['layers_total']} layers, peak RSS "
              f"{res['peak_rss'] / gib:.2f} GiB (address space {res['peak_vm'] / gib:.2f} GiB, "
              f"limit {limit / gib:.2f} GiB), estimate {estimate / gib:.2f} GiB "
              f"(+ process {plan['base'] / gib:.2f} GiB), "
              f"ratio {run['ratio_peak_to_estimate']:.2f}"
              f" ({run['ratio_peak_minus_base_to_estimate']:.2f} without the process base); "
              f"layer + activations + statistics {formula / gib:.2f} GiB, peak over it "
              f"{run['ratio_peak_to_formula']:.2f} ({run['ratio_peak_minus_base_to_formula']:.2f}"
              f" without the process base), "
              f"{run['mean_seconds_per_layer']:.1f} s/layer, model {params / 1e9:.2f}B params, "
              f"{disk / 1e9:.2f} GB on disk", flush=True)
    dest = ROOT / "results" / "bench_stream.json"
    if dest.exists():  # runs of other methods / limits measured before are kept
        results["runs"] = {**json.loads(dest.read_text()).get("runs", {}), **results["runs"]}
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
