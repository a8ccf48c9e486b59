"""Per-layer costs of pruning at Llama-2-70B shapes, measured on this CPU, for the README's
estimate of pruning Llama-2-70B on one H100 and on 8x H100.

Llama-2-70B: 80 decoder layers, hidden 8192, intermediate 28672, 64 query heads and 8 KV heads
of 128 (q 8192x8192, k and v 1024x8192, o 8192x8192, gate and up 28672x8192, down 8192x28672).
SparseGPT solves four input groups per layer: q/k/v (8192 columns, 10240 rows), o (8192, 8192),
gate/up (8192, 57344) and down (28672, 8192).

What is timed (random data; one CPU thread unless --threads; process CPU seconds, best of 1-3):
- gemm: fp32 and bf16 matrix products (the machine's throughput, to turn FLOPs into seconds);
- hessian: ``H.addmm_(X^T, X)`` for 8192 columns (the statistics, 2*T*c^2 FLOPs for T tokens);
- factor: the damped Cholesky factor of H^-1 (``inverse_hessian_factor``) for c = 2048, 4096,
  8192 columns (c^3/3 for the Cholesky + c^3/3 for the triangular inverse);
- sweep: ``sparsegpt_prune`` for c = 8192 with a few row counts; its time is
  factor + rows x (per-row cost), so the per-row cost is the slope. The full row counts (up to
  57344) and down_proj's 28672 columns (its Hessian alone is 3.3 GB, six such buffers do not fit
  beside the other jobs on this machine) are **extrapolated**: linearly in rows, and with c^2
  for the per-row cost (lazy updates, 2 c^2 FLOPs per row) and c^3 for the factor;
- wanda: ``wanda_prune`` of 2048 rows x 8192 and x 28672, extrapolated linearly in rows;
- layer_forward: one Llama-2-70B decoder layer (random fp32 weights, 3.4 GB; bf16 is not fast on
  every CPU) on 1 x 128 tokens, against its FLOP count 2 x params x tokens + attention.

    OMP_NUM_THREADS=1 .venv/bin/python eval/bench_layer_cost.py        # about 5 minutes

Writes eval/results/bench_layer_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from llmprune.core.sparsity import Sparsity
from llmprune.solvers.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from llmprune.solvers.wanda import wanda_prune

HIDDEN, INTER, HEADS, KV, HEAD_DIM, LAYERS = 8192, 28672, 64, 8, 128, 80
GROUPS = {  # name: (input columns, stacked rows)
    "qkv": (HIDDEN, HIDDEN + 2 * KV * HEAD_DIM),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (HIDDEN, 2 * INTER),
    "down": (INTER, HIDDEN),
}


def best_of(fn, repeat: int = 2) -> float:
    """Best of ``repeat`` runs, in process CPU seconds: on one thread that is the time the work
    takes, robust to other jobs sharing the cores (wall-clock is not, on this machine)."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def spd(c: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(tokens, c, generator=gen)
    return x.T @ x


def bench_gemm(dtype, m: int, k: int, n: int) -> dict:
    """``x @ W^T`` as nn.Linear computes it (x [m, k], W [n, k])."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    s = best_of(lambda: torch.nn.functional.linear(a, b), 2)
    return {"shape": [m, k, n], "dtype": str(dtype), "seconds": s,
            "gflops": 2 * m * k * n / s / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default="eval/results/bench_layer_cost.json",
                    help="where to write the JSON results")
    ap.add_argument("--skip-forward", action="store_true",
                    help="skip the 3.4 GB decoder-layer forward measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    res: dict = {"threads": args.threads, "torch": torch.__version__,
                 "machine": platform.processor() or platform.machine()}

    # bf16 is small: on CPUs without avx512_bf16/AMX it runs at ~10 GFLOP/s on one thread
    res["gemm"] = [bench_gemm(torch.float32, 512, 8192, 8192),
                   bench_gemm(torch.bfloat16, 256, 8192, 2048)]
    print("gemm", [(g["dtype"], round(g["gflops"], 1)) for g in res["gemm"]], flush=True)

    h = torch.zeros(HIDDEN, HIDDEN)
    x = torch.randn(1024, HIDDEN, generator=gen)
    s = best_of(lambda: h.addmm_(x.T, x), 2)
    res["hessian"] = {"columns": HIDDEN, "tokens": 1024, "seconds": s,
                      "gflops": 2 * 1024 * HIDDEN ** 2 / s / 1e9}
    print("hessian", res["hessian"], flush=True)
    del h, x

    res["factor"] = []
    for c in (2048, 4096, 8192):
        hc = spd(c, 2 * c, gen)
        s = best_of(lambda: inverse_hessian_factor(hc, 0.01), 1 if c == 8192 else 2)
        res["factor"].append({"columns": c, "seconds": s,
                              "gflops": (2 * c ** 3 / 3) / s / 1e9})
        print("factor", res["factor"][-1], flush=True)
        del hc

    hc = spd(HIDDEN, 2 * HIDDEN, gen)
    sweeps = []
    for target in (Sparsity.parse(0.5, None), Sparsity.parse(None, "2:4")):
        for rows in (256, 1024):
            w = torch.randn(rows, HIDDEN, generator=gen)
            s = best_of(lambda: sparsegpt_prune(w, hc, target), 1)
            sweeps.append({"target": target.label, "columns": HIDDEN, "rows": rows,
                           "seconds": s})
            print("sparsegpt", sweeps[-1], flush=True)
    res["sparsegpt"] = sweeps
    del hc

    res["wanda"] = []
    for c in (HIDDEN, INTER):
        w = torch.randn(2048, c, generator=gen)
        sq = torch.rand(c, generator=gen)
        s = best_of(lambda: wanda_prune(w, sq, Sparsity.parse(0.5, None)), 2)
        res["wanda"].append({"columns": c, "rows": 2048, "seconds": s})
        print("wanda", res["wanda"][-1], flush=True)
        del w

    if not args.skip_forward:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import (LlamaDecoderLayer,
                                                              LlamaRotaryEmbedding)

        cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                          num_key_value_heads=KV, num_hidden_layers=1, max_position_embeddings=4096)
        layer = LlamaDecoderLayer(cfg, 0).eval()
        tokens = 128
        hidden = torch.randn(1, tokens, HIDDEN, generator=gen)
        pos = torch.arange(tokens).unsqueeze(0)
        cos, sin = LlamaRotaryEmbedding(cfg)(hidden, pos)
        params = sum(p.numel() for p in layer.parameters())
        with torch.no_grad():
            s = best_of(lambda: layer(hidden, position_embeddings=(cos, sin),
                                      attention_mask=None), 2)
        flops = 2 * params * tokens + 4 * tokens * tokens * HIDDEN  # GEMMs + attention
        res["layer_forward"] = {"dtype": "float32", "tokens": tokens, "params": params,
                                "seconds": s, "flops": flops, "gflops": flops / s / 1e9}
        print("layer_forward", res["layer_forward"], flush=True)
        del layer

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")  # the measurements, whatever follows
    res["extrapolated"] = extrapolate(res)
    print(json.dumps(res["extrapolated"], indent=2))
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


def extrapolate(res: dict) -> dict:
    """Seconds per Llama-2-70B layer on this CPU at this thread count (see module doc)."""
    f = {r["columns"]: r["seconds"] for r in res["factor"]}
    cubic = f[8192] / f[4096]  # ~8 if the factor scales as c^3
    out = {"factor_8192_over_4096": cubic}
    for label in sorted({r["target"] for r in res["sparsegpt"]}):
        runs = [r for r in res["sparsegpt"] if r["target"] == label]
        (r1, r2) = sorted(runs, key=lambda r: r["rows"])
        per_row = (r2["seconds"] - r1["seconds"]) / (r2["rows"] - r1["rows"])  # c = 8192
        total = 0.0
        per_group = {}
        for name, (c, rows) in GROUPS.items():
            scale = (c / HIDDEN)
            # per-row cost: lazy updates 2 c^2 FLOPs per row (c^2), the in-block OBS updates
            # and the per-column ops (c); take c^2, the upper of the two
            t = f[8192] * scale ** 3 + per_row * rows * scale ** 2
            per_group[name] = t
            total += t
        overhead = r1["seconds"] - f[8192] - per_row * r1["rows"]  # per-column small ops
        out[f"sparsegpt_{label}"] = {"per_row_seconds_c8192": per_row,
                                     "per_row_gflops": HIDDEN ** 2 / per_row / 1e9,
                                     "per_column_overhead_seconds": overhead / HIDDEN,
                                     "per_group_seconds": per_group,
                                     "layer_seconds": total,
                                     "model_hours": total * LAYERS / 3600}
    w = {r["columns"]: r["seconds"] / r["rows"] for r in res["wanda"]}
    wl = sum(w[c] * rows for c, rows in GROUPS.values())
    out["wanda_50%"] = {"layer_seconds": wl, "model_hours": wl * LAYERS / 3600}
    hess = res["hessian"]["seconds"] / (2 * 1024 * HIDDEN ** 2)  # seconds per FLOP
    per_token = 2 * (3 * HIDDEN ** 2 + INTER ** 2)  # q/k/v, o, gate/up: 8192^2; down: 28672^2
    out["hessian_flops_per_token_per_layer"] = per_token
    out["hessian_seconds_per_layer_128x2048"] = hess * per_token * 128 * 2048
    return out


if __name__ == "__main__":
    main()
