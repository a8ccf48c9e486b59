"""End-to-end check of the 2:4 kernels issue on smollm2-135m: perplexity of a compact 2:4 export
loaded with ``llmprune.load_pretrained(DIR, kernels=...)`` against the dense pruned model in the
same dtype (goal: within 1e-3 relative). On CPU ``auto`` dispatches to dense.

    .venv/bin/python eval/kernels_e2e.py                     # magnitude 2:4, bf16, kernels=auto
    .venv/bin/python eval/kernels_e2e.py --method sparsegpt --kernels triton   # on a GPU
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="magnitude")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    import llmprune
    from transformers import AutoModelForCausalLM

    from llmprune.io.data import load_text, tokenize
    from llmprune.evaluate.ppl import perplexity
    from llmprune.io.checkpoints import export_checkpoint
    from llmprune.sparse.linear import SparseLinear

    work = Path(tempfile.mkdtemp(prefix="llmprune-kernels-e2e-"))
    dense_dir, compact_dir = work / "dense", work / "compact"
    recipe = llmprune.PruneRecipe(args.method, pattern="2:4", nsamples=32, seqlen=512)
    llmprune.prune_checkpoint("smollm2-135m", recipe, str(dense_dir), progress=False)
    export_checkpoint(str(dense_dir), str(compact_dir), "compact", "bf16", progress=False)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).eval()
    fast = llmprune.load_pretrained(compact_dir, kernels=args.kernels)
    dense.to(args.device)
    fast.to(args.device)
    from transformers import AutoTokenizer

    ids = tokenize(AutoTokenizer.from_pretrained(dense_dir), load_text("wikitext2", "eval").text)
    a = perplexity(dense, ids, 1024, 16, device=args.device, progress=False)
    b = perplexity(fast, ids, 1024, 16, device=args.device, progress=False)
    n = sum(isinstance(m, SparseLinear) for m in fast.modules())
    print(f"device {args.device}, kernels={args.kernels}: {n} SparseLinear modules; "
          f"dense pruned bf16 perplexity {a:.6f}; compact + kernels {b:.6f}; "
          f"relative difference {abs(a - b) / a:.2e}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
