"""DARE benchmark on a real fine-tuned pair built from smollm2-135m.

1. **The pair** (rebuilt deterministically, never committed): smollm2-135m (the base) fully
   fine-tuned on Python source code, a domain clearly unlike WikiText: the standard library's
   ``json``, ``email``, ``http``, ``logging`` and ``asyncio`` packages of the running Python,
   files in sorted order, read as one text. The first 90% of its tokens train (``--steps`` AdamW
   steps of 4 x 256 tokens, lr 5e-5, seed 0), the last 10% evaluate. Saved to
   ``eval/.cache/smollm2-pycode`` (git-ignored).
2. **The table**: for drop 0.5, 0.9, 0.99: random + no rescale, random + DARE rescale,
   random + DAREx-q (global search, and per-layer closed form), magnitude (no rescale), each
   merged with ``llmprune dare`` and scored by perplexity on the held-out code (16 x 256
   tokens) and on WikiText-2 test (16 x 1024 tokens, the protocol). DAREx-q's calibration text
   is the start of the fine-tuning (training) portion of the code, 8 x 256 tokens, never the
   held-out code.

    .venv/bin/python eval/bench_dare.py            # builds the pair once, then the table

Writes eval/results/bench_dare.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "eval" / ".cache" / "smollm2-pycode"
PACKAGES = ("json", "email", "http", "logging", "asyncio")


def code_text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for pkg in PACKAGES for p in (stdlib / pkg).rglob("*.py"))
    return "\n\n".join(p.read_text(errors="replace") for p in files)


def build_pair(steps: int) -> Path:
    from llmprune.loaders import load_model
    from llmprune.io.loading import smollm2_checkpoint

    if (PAIR / "config.json").exists():
        return PAIR
    torch.manual_seed(0)
    model, tok, _ = load_model(str(smollm2_checkpoint()))
    ids = tok(code_text(), return_tensors="pt")["input_ids"][0]
    train = ids[: int(0.9 * ids.numel())]
    windows = train[: train.numel() // 256 * 256].view(-1, 256)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    t = time.perf_counter()
    for step in range(steps):
        batch = windows[order[(step * 4) % len(order):][:4]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - t:.0f} s)",
                  flush=True)
    model.eval()
    tmp = PAIR.parent / f".{PAIR.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(PAIR, ignore_errors=True)
    tmp.rename(PAIR)
    return PAIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--drops", default="0.5,0.9,0.99")
    ap.add_argument("--q-modes", default="global,per-layer",
                    help="which DAREx-q rows to run (comma list of global, per-layer)")
    ap.add_argument("--json", default=str(ROOT / "eval" / "results" / "bench_dare.json"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.delta.dare import dare
    from llmprune.io.data import load_text, tokenize
    from llmprune.evaluate.ppl import perplexity
    from llmprune.io.loading import smollm2_checkpoint

    base = str(smollm2_checkpoint())
    tuned = str(build_pair(args.steps))
    tok = AutoTokenizer.from_pretrained(tuned)
    code_ids = tok(code_text(), return_tensors="pt")["input_ids"][0]
    code_eval = code_ids[int(0.9 * code_ids.numel()):]
    wiki = tokenize(tok, load_text("wikitext2", "eval").text)

    def score(path: str) -> dict:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return {"code_ppl": perplexity(m, code_eval, 256, 16, progress=False),
                "wikitext_ppl": perplexity(m, wiki, 1024, 16, progress=False)}

    rows = [{"model": "base (smollm2-135m)", **score(base)},
            {"model": "fine-tuned", **score(tuned)}]
    print(json.dumps(rows), flush=True)
    work = Path(tempfile.mkdtemp(prefix="llmprune-dare-"))
    calib = work / "code-train-calib.txt"  # from the training 90% only
    calib.write_text(tok.decode(code_ids[: 2 * 8 * 256]))
    for drop in (float(d) for d in args.drops.split(",")):
        variants = [("random", "none", None), ("random", "dare", None)]
        variants += [("random", "darex-q", m) for m in args.q_modes.split(",") if m]
        variants += [("magnitude", "none", None)]
        for method, rescale, q_mode in variants:
            out = work / f"{method}-{rescale}-{q_mode}-{drop}"
            t = time.perf_counter()
            meta = dare(base, tuned, drop, method, rescale, seed=0, output=str(out),
                        progress=False, q_mode=q_mode or "global", calib_data=str(calib),
                        nsamples=8, seqlen=256)
            row = {"drop": drop, "method": method,
                   "rescale": rescale + (f" ({q_mode})" if q_mode else ""),
                   "seconds": round(time.perf_counter() - t, 1), **score(str(out))}
            if "darex_q" in meta:
                row["q"] = meta["darex_q"]["q_global"]
                row["per_layer_q"] = meta["darex_q"].get("per_layer_q")
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    Path(args.json).write_text(json.dumps({"pair": {"base": "smollm2-135m", "finetune": {
        "data": f"Python stdlib {', '.join(PACKAGES)} (first 90% of tokens)",
        "steps": args.steps, "batch": "4 x 256", "lr": 5e-5}}, "rows": rows}, indent=2) + "\n")
    print("\n| model | drop | selection | rescale | q | code ppl | WikiText ppl |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        q = f"{r['q']:.4g}" if "q" in r else "-"
        print(f"| {r.get('model', 'dare')} | {r.get('drop', '-')} | {r.get('method', '-')} | "
              f"{r.get('rescale', '-')} | {q} | {r['code_ppl']:.3f} | {r['wikitext_ppl']:.3f} |")


if __name__ == "__main__":
    main()
