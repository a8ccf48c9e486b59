"""2:4 kernel benchmark (issue: sparse kernels), on one CUDA GPU.

Sweeps M (rows of x: 1 = one decoded token, 4096 = a long prefill) over the Llama-7B linear shapes
4096x4096 (q/k/v/o), 11008x4096 (gate/up) and 4096x11008 (down), in fp16 and bf16, and times
``y = x @ W.T`` for a random 2:4 ``W`` with:

* ``dense``: ``F.linear`` on the dense weight (cuBLAS);
* ``triton``: llmprune_kernels.matmul on the compact weight (values + packed indices, llmprune's
  export layout), autotuned (small-M and large-M configs; tuning is done in the warm-up);
* ``semi``: PyTorch semi-structured sparse tensors (cuSPARSELt, else CUTLASS; sm80+).

Times are medians of CUDA-event timings after warm-up. Each sparse result is also checked against
dense (max relative error). The ``auto`` column is what SparseLinear's dispatch would pick from
these timings (a sparse backend only where it beats dense by 5%).

    .venv/bin/python eval/bench_kernels.py                      # a few minutes (autotuning)
    .venv/bin/python eval/bench_kernels.py --m 1 16 --dtypes fp16

Prints a table and writes eval/results/bench_kernels.json. Without a CUDA GPU it says so in one
line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
MS = [1, 16, 256, 2048, 4096]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=MS)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES],
                    help="OUTxIN weight shapes")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=str(ROOT / "eval" / "results" / "bench_kernels.json"))
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here; the 2:4 kernels are only benchmarked on a GPU")
        return 0

    import llmprune_kernels as K
    from llmprune.sparse.linear import MARGIN, random_two_four, time_ms

    device = torch.device("cuda")
    have_triton = K.triton_usable(device)
    meta = {"device": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": __import__("triton").__version__ if have_triton else None,
            "cusparselt": bool(getattr(torch.backends, "cusparselt", None)
                               and torch.backends.cusparselt.is_available()),
            "python": platform.python_version(), "reps": args.reps, "margin": MARGIN}
    print(f"# {meta['device']} (sm{meta['capability'][0]}{meta['capability'][1]}), torch "
          f"{meta['torch']}, triton {meta['triton']}, cuSPARSELt {meta['cusparselt']}")
    header = (f"{'dtype':5} {'weight':>11} {'M':>5} | {'dense ms':>9} {'triton ms':>9} "
              f"{'semi ms':>9} | {'triton x':>8} {'semi x':>7} | {'auto':<6} | "
              f"{'err triton':>10} {'err semi':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    t_start = time.perf_counter()
    for dname in args.dtypes:
        dtype = getattr(torch, DTYPES[dname])
        for shape_text in args.shapes:
            out, cols = (int(v) for v in shape_text.lower().split("x"))
            w = random_two_four(out, cols, dtype, device)
            values, indices = K.compress(w) if have_triton else K.compress_ref(w)
            assert torch.equal(K.decompress_ref(values, indices, cols), w)
            semi = (K.to_semi_structured(w)
                    if K.semi_structured_usable(device, dtype, (out, cols)) else None)
            for m in args.m:
                x = torch.randn(m, cols, device=device, dtype=dtype)
                row = {"dtype": dname, "out": out, "in": cols, "m": m}
                with torch.no_grad():
                    ref = F.linear(x, w)
                    scale = ref.float().abs().max().item() or 1.0
                    row["dense_ms"] = time_ms(lambda: F.linear(x, w), device, args.reps,
                                              args.warmup)
                    for name, fn in (("triton", (lambda: K.matmul(x, values, indices))
                                      if have_triton else None),
                                     ("semi", (lambda: K.semi_structured_linear(x, semi, None))
                                      if semi is not None else None)):
                        if fn is None:
                            row[f"{name}_ms"] = row[f"{name}_err"] = None
                            continue
                        row[f"{name}_ms"] = time_ms(fn, device, args.reps, args.warmup)
                        row[f"{name}_err"] = (fn().float() - ref.float()).abs().max().item() / scale
                best, best_ms = "dense", row["dense_ms"] * (1 - MARGIN)
                for name in ("triton", "semi"):
                    if row[f"{name}_ms"] is not None and row[f"{name}_ms"] < best_ms:
                        best, best_ms = name, row[f"{name}_ms"]
                row["auto"] = best
                for name in ("triton", "semi"):
                    row[f"{name}_speedup"] = (row["dense_ms"] / row[f"{name}_ms"]
                                              if row[f"{name}_ms"] else None)
                rows.append(row)

                def f(v, spec):
                    return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))
                print(f"{dname:5} {f'{out}x{cols}':>11} {m:>5} | {f(row['dense_ms'], '9.4f')} "
                      f"{f(row['triton_ms'], '9.4f')} {f(row['semi_ms'], '9.4f')} | "
                      f"{f(row['triton_speedup'], '8.2f')} {f(row['semi_speedup'], '7.2f')} | "
                      f"{best:<6} | {f(row['triton_err'], '10.2e')} {f(row['semi_err'], '9.2e')}",
                      flush=True)
    meta["seconds"] = time.perf_counter() - t_start
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
