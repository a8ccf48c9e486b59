"""Export benchmark (issue: compact exports), on smollm2-135m.

For each pattern (2:4 and 50% unstructured) it prunes smollm2-135m once (magnitude by default:
the sizes, costs and exactness measured here do not depend on the solver), saves it dense, then:

* **size**: exports it compact in bf16 and compares the bytes with dense bf16 and with the
  analytic ideal (tied embeddings and norms stay plain bf16; a 2:4 linear takes 0.5625 x dense;
  a 50% unstructured linear takes nnz x 2 + out x ceil(in/8) + 4 (out + 1) bytes);
* **exactness**: loads the export with llmprune.load_pretrained and checks that every tensor and
  the logits on the perplexity windows equal the dense pruned model's loaded in the same dtype
  (bf16, and fp32 from an fp32 export), and that perplexity is unchanged;
* **cost**: in fresh subprocesses, alternating, ``--repeats`` times each, with each process's
  peak RSS (VmHWM) and its RSS before the operation:
  - ``save``: plain ``save_pretrained`` of the pruned model loaded in bf16;
  - ``export-mem``: the compact export of that same in-memory bf16 model (what ``--export
    compact`` does after pruning);
  - ``export-disk``: ``llmprune export --format compact --dtype bf16`` from the dense fp32
    checkpoint on disk, with the default 5GB shards and with 20MB shards (peak RAM ~ one shard).
  Each is timed until the call returns (data in the page cache) and until ``os.sync()`` has put
  it on disk. Ratios are of the medians.

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
    """One timed operation in a fresh process. ``returned``: until the call returns (data in the
    page cache); ``durable``: until os.sync() has also written it to disk."""
    import os

    import torch

    from llmprune.io.checkpoints import export_checkpoint
    from llmprune.io.export import export
    from llmprune.io.sources import model_source
    from llmprune.io.meta import read_masks, read_meta

    model = None
    if args.worker in ("save", "export-mem"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.bfloat16)
        masks = {k.removesuffix(".weight"): v for k, v in read_masks(Path(args.src)).items()}
        meta = read_meta(Path(args.src))
    os.sync()
    base_rss = peak_rss_mib()
    t = time.perf_counter()
    if args.worker == "save":  # plain dense save_pretrained of the same bf16 model
        model.save_pretrained(args.out)
    elif args.worker == "export-mem":  # what `--export compact` does after pruning
        Path(args.out).mkdir(parents=True)
        export(model_source(model, masks, meta), Path(args.out), "compact", "auto",
               progress=False)
    else:  # `llmprune export SRC --format compact --dtype bf16` from the dense fp32 checkpoint
        export_checkpoint(args.src, args.out, "compact", "bf16", max_shard_size=args.shard,
                          progress=False)
    returned = time.perf_counter() - t
    os.sync()
    durable = time.perf_counter() - t
    return {"returned_seconds": returned, "durable_seconds": durable,
            "peak_rss_mib": peak_rss_mib(), "rss_before_mib": base_rss}


def run_worker(kind: str, src: Path, out: Path, shard: str = "5GB") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--src", str(src),
                           "--out", str(out), "--shard", shard], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ideal_bytes(meta: dict) -> int:
    """The analytic size of the export: plain tensors as they are, pruned linears at the
    formula of their pattern (see the module docstring)."""
    from llmprune.io.compact import index_bits

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
    ap.add_argument("--repeats", type=int, default=7,
                    help="fresh processes per cost operation (sub-second operations on a shared "
                         "machine: medians of 3 moved by 2x between runs)")
    ap.add_argument("--json", default=str(ROOT / "eval" / "results" / "bench_export.json"))
    ap.add_argument("--worker", choices=["save", "export-mem", "export-disk"])
    ap.add_argument("--shard", default="5GB")
    ap.add_argument("--src")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch
    from transformers import AutoModelForCausalLM

    import llmprune
    from llmprune.io.data import load_text, tokenize
    from llmprune.evaluate.ppl import perplexity
    from llmprune.io.checkpoints import export_checkpoint

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

        # cost: alternate the three in fresh processes; medians
        kinds = {"save": {}, "export-mem": {}, "export-disk": {}, "export-disk-20MB": {}}
        runs: dict[str, list] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                runs[kind].append(run_worker(kind.removesuffix("-20MB"), dense_dir,
                                             work / "cost-out",
                                             "20MB" if kind.endswith("20MB") else "5GB"))
        med = {k: {m: statistics.median(r[m] for r in v)
                   for m in ("returned_seconds", "durable_seconds")} for k, v in runs.items()}
        row["cost"] = {
            "runs": runs, "medians": med,
            "export_mem_over_save": med["export-mem"]["returned_seconds"]
            / med["save"]["returned_seconds"],
            "export_disk_over_save": med["export-disk"]["returned_seconds"]
            / med["save"]["returned_seconds"],
            "durable_export_mem_over_save": med["export-mem"]["durable_seconds"]
            / med["save"]["durable_seconds"],
            "durable_export_disk_over_save": med["export-disk"]["durable_seconds"]
            / med["save"]["durable_seconds"],
            "peak_rss_mib": {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()},
            "rss_before_mib": {k: max(r["rss_before_mib"] for r in v) for k, v in runs.items()},
        }
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    print()
    print("| pattern | compact MiB | dense bf16 MiB | compact/dense | files/ideal | linears/dense "
          "| tensors+logits equal (bf16, fp32) | ppl dense | ppl compact |")
    print("|" + "---|" * 9)
    for row in results["runs"]:
        s, e = row["size"], row["exactness"]
        same = all(v["tensors_equal"] and v["logits_equal_window0"] for v in e.values())
        print(f"| {row['pattern']} | {s['compact_file_bytes'] / 2**20:.2f} | "
              f"{s['dense_bf16_tensor_bytes'] / 2**20:.2f} | {s['compact_over_dense']:.4f} | "
              f"{s['files_over_ideal']:.5f} | {s['pruned_linears_over_dense']:.4f} | {same} | "
              f"{e['bf16']['perplexity_dense']:.4f} | {e['bf16']['perplexity_compact']:.4f} |")
    print()
    print("| pattern | operation | seconds (returned) | seconds (durable) | / save (returned) | "
          "/ save (durable) | peak RSS MiB | RSS before MiB |")
    print("|" + "---|" * 8)
    for row in results["runs"]:
        c = row["cost"]
        for kind, m in c["medians"].items():
            base = c["medians"]["save"]
            print(f"| {row['pattern']} | {kind} | {m['returned_seconds']:.3f} | "
                  f"{m['durable_seconds']:.3f} | "
                  f"{m['returned_seconds'] / base['returned_seconds']:.2f} | "
                  f"{m['durable_seconds'] / base['durable_seconds']:.2f} | "
                  f"{c['peak_rss_mib'][kind]:.0f} | {c['rss_before_mib'][kind]:.0f} |")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
