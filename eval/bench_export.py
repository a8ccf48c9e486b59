"""Export benchmark (issue: compact exports), on smollm2-135m.

For each pattern (2:4 and 50% unstructured) it prunes smollm2-135m once (magnitude by default:
the sizes, costs and exactness measured here do not depend on the solver), saves it dense, then:

* **size**: exports it compact in bf16 and compares the bytes with dense bf16 and with the
  analytic ideal (tied embeddings and norms stay plain bf16; a 2:4 linear takes 0.5625 x dense;
  a 50% unstructured linear takes nnz x 2 + out x ceil(in/8) + 4 (out + 1) bytes);
* **exactness**: loads the export with llmprune.load_pretrained and checks that every tensor and
  the logits on the perplexity windows equal the dense pruned model's loaded in the same dtype
  (bf16, and fp32 from an fp32 export), and that perplexity is unchanged;
* **cost**: in fresh subprocesses, alternating, ``--repeats`` times each, times (a) a plain
  ``save_pretrained`` of the pruned model in bf16 and (b) ``llmprune export --format compact
  --dtype bf16`` from the dense pruned checkpoint on disk, with each process's peak RSS (VmHWM).
  The ratio is of the medians.

    .venv/bin/python eval/bench_export.py                 # about 5 minutes
    .venv/bin/python eval/bench_export.py --method wanda  # a calibrated solver instead

Prints a table and writes eval/results/bench_export.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEQLEN, EVAL_WINDOWS = 1024, 16


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def worker(args) -> dict:
    import torch

    if args.worker == "save":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.bfloat16)
        t = time.perf_counter()
        model.save_pretrained(args.out)
        seconds = time.perf_counter() - t
    else:
        from llmprune.export import export_checkpoint

        t = time.perf_counter()
        export_checkpoint(args.src, args.out, "compact", "bf16", progress=False)
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib()}


def run_worker(kind: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--src", str(src),
                           "--out", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ideal_bytes(meta: dict) -> int:
    """The analytic size of the export: plain tensors as they are, pruned linears at the
    formula of their pattern (see the module docstring)."""
    from llmprune.compact import index_bits

    total = 0
    for info in meta["tensors"].values():
        dense = info["dense_bytes"]
        if info["pattern"] == "dense":
            total += dense
            continue
        out_f, in_f = info["shape"]
        esize = dense // (out_f * in_f)
        if ":" in info["pattern"]:
            n, m = (int(v) for v in info["pattern"].split(":"))
            k = in_f // m * n  # kept values per row
            total += out_f * k * esize + out_f * -(-k * index_bits(m) // 8)
        else:
            nnz = round((1 - info["sparsity"]) * out_f * in_f)
            total += nnz * esize + out_f * ((in_f + 7) // 8) + 4 * (out_f + 1)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="magnitude")
    ap.add_argument("--patterns", default="2:4,0.5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "eval" / "results" / "bench_export.json"))
    ap.add_argument("--worker", choices=["save", "export"])
    ap.add_argument("--src")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch
    from transformers import AutoModelForCausalLM

    import llmprune
    from llmprune.data import load_text, tokenize
    from llmprune.evaluate import perplexity
    from llmprune.export import export_checkpoint

    work = Path(tempfile.mkdtemp(prefix="llmprune-bench-export-"))
    results = {"model": "smollm2-135m", "method": args.method, "runs": []}
    test_ids = None
    for pattern in args.patterns.split(","):
        row: dict = {"pattern": pattern}
        dense_dir = work / f"dense-{pattern.replace(':', 'of')}"
        nm = ":" in pattern
        recipe = llmprune.PruneRecipe(args.method, sparsity=None if nm else float(pattern),
                                      pattern=pattern if nm else None, nsamples=32, seqlen=512)
        llmprune.prune_checkpoint("smollm2-135m", recipe, str(dense_dir), progress=False)

        # size (bf16) and the analytic ideal
        compact_dir = work / f"compact-bf16-{pattern.replace(':', 'of')}"
        meta = export_checkpoint(str(dense_dir), str(compact_dir), "compact", "bf16",
                                 progress=False)
        dense_bf16 = meta["totals"]["dense_tensor_bytes"]
        ideal = ideal_bytes(meta)
        linear = [i for i in meta["tensors"].values() if i["pattern"] != "dense"]
        row["size"] = {
            "compact_tensor_bytes": meta["totals"]["tensor_bytes"],
            "compact_file_bytes": meta["totals"]["file_bytes"],
            "dense_bf16_tensor_bytes": dense_bf16,
            "ideal_bytes": ideal,
            "compact_over_dense": meta["totals"]["tensor_bytes"] / dense_bf16,
            "files_over_ideal": meta["totals"]["file_bytes"] / ideal,
            "pruned_linears_over_dense": sum(i["bytes"] for i in linear)
            / sum(i["dense_bytes"] for i in linear),
            "encodings": sorted({i["encoding"] for i in linear}),
        }

        # exactness: tensors, logits, perplexity (bf16 export vs dense loaded in bf16; fp32 too)
        if test_ids is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(dense_dir)
            test_ids = tokenize(tok, load_text("wikitext2", "eval").text)
        fp32_dir = work / f"compact-fp32-{pattern.replace(':', 'of')}"
        export_checkpoint(str(dense_dir), str(fp32_dir), "compact", "fp32", progress=False)
        exact = {}
        for name, cdir, dtype in (("bf16", compact_dir, torch.bfloat16),
                                  ("fp32", fp32_dir, torch.float32)):
            ref = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype).eval()
            got = llmprune.load_pretrained(cdir).eval()
            sd_ref, sd_got = ref.state_dict(), got.state_dict()
            same_tensors = all(torch.equal(sd_got[k], v) for k, v in sd_ref.items())
            window = test_ids[: EVAL_SEQLEN].unsqueeze(0)
            with torch.no_grad():
                same_logits = torch.equal(ref(window).logits, got(window).logits)
            p_ref = perplexity(ref, test_ids, EVAL_SEQLEN, EVAL_WINDOWS, progress=False)
            p_got = perplexity(got, test_ids, EVAL_SEQLEN, EVAL_WINDOWS, progress=False)
            exact[name] = {"tensors_equal": same_tensors, "logits_equal_window0": same_logits,
                           "perplexity_dense": p_ref, "perplexity_compact": p_got}
            del ref, got
        row["exactness"] = exact

        # cost: alternate save_pretrained and export in fresh processes
        saves, exports = [], []
        for _ in range(args.repeats):
            saves.append(run_worker("save", dense_dir, work / "save-out"))
            exports.append(run_worker("export", dense_dir, work / "export-out"))
        s_med = statistics.median(r["seconds"] for r in saves)
        e_med = statistics.median(r["seconds"] for r in exports)
        row["cost"] = {"save_pretrained_bf16_seconds": [r["seconds"] for r in saves],
                       "export_compact_bf16_seconds": [r["seconds"] for r in exports],
                       "export_over_save": e_med / s_med,
                       "save_peak_rss_mib": max(r["peak_rss_mib"] for r in saves),
                       "export_peak_rss_mib": max(r["peak_rss_mib"] for r in exports)}
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    print()
    print("| pattern | compact MiB | dense bf16 MiB | compact/dense | files/ideal | linears/dense "
          "| tensors equal | logits equal | ppl dense | ppl compact | export s | save s | "
          "export/save | export RSS MiB | save RSS MiB |")
    print("|" + "---|" * 15)
    for row in results["runs"]:
        s, e, c = row["size"], row["exactness"]["bf16"], row["cost"]
        print(f"| {row['pattern']} | {s['compact_file_bytes'] / 2**20:.2f} | "
              f"{s['dense_bf16_tensor_bytes'] / 2**20:.2f} | {s['compact_over_dense']:.4f} | "
              f"{s['files_over_ideal']:.5f} | {s['pruned_linears_over_dense']:.4f} | "
              f"{e['tensors_equal'] and row['exactness']['fp32']['tensors_equal']} | "
              f"{e['logits_equal_window0'] and row['exactness']['fp32']['logits_equal_window0']} | "
              f"{e['perplexity_dense']:.4f} | {e['perplexity_compact']:.4f} | "
              f"{statistics.median(c['export_compact_bf16_seconds']):.2f} | "
              f"{statistics.median(c['save_pretrained_bf16_seconds']):.2f} | "
              f"{c['export_over_save']:.2f} | {c['export_peak_rss_mib']:.0f} | "
              f"{c['save_peak_rss_mib']:.0f} |")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
