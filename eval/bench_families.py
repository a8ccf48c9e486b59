"""Which model families each tool prunes correctly: llmprune against llm-compressor.

For every model type below, a tiny random model of transformers' own class (2 layers, hidden 64,
vocabulary 300; MoE types with 4 experts) is built from its config and saved; no download. Then
SparseGPT 50% unstructured and Wanda 2:4 run

* with llmprune (``llmprune.prune`` on the same calibration ids, ``save_pretrained``), and
* with the peer, llm-compressor 0.14.0.1 (``eval/peer_llmcompressor.py`` in ``eval/.peer-venv``,
  made by ``eval/peer_setup.sh``; targets every ``Linear`` but the LM head),

on the same calibration token ids (8 random sequences of 64 tokens). Each output is checked the
same way, independently of both tools, in this process: plain
``AutoModelForCausalLM.from_pretrained`` with no missing or unexpected keys (a missing key is a
weight transformers re-initialises at random), every prunable weight at the target (every
``nn.Linear`` but the LM head and routers, and every expert of every fused ``[experts, ...]``
parameter; 50%: within one weight per row; 2:4: at least 2 zeros in every 4 consecutive inputs),
routers unchanged, finite logits. A cell is ``ok`` with the pruning time in seconds, or what
failed.

    .venv/bin/python eval/bench_families.py                   # all types, ours and the peer
    .venv/bin/python eval/bench_families.py --types llama,mixtral --skip-peer

Writes eval/results/bench_families.json (rows of types not run this time are kept) and prints
the markdown table (docs/models.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
PEER_PY = ROOT / "eval" / ".peer-venv" / "bin" / "python"
PEER_TIMEOUT = 180  # seconds per peer run (a tiny model takes under 5 s where it works)
sys.path.insert(0, str(ROOT))
# the tiny models' configs: one table, shared with the tests
from tests.tiny_families import (DENSE, EXPERTS, HYBRID, MOE, VOCAB,  # noqa: E402
                                 tiny_family_model)

KINDS = {**{t: "dense" for t in DENSE}, **{t: "hybrid" for t in HYBRID},
         **{t: "moe" for t in MOE}}
RUNS = {"sparsegpt 50%": ("sparsegpt", 0.5, "0:0"), "wanda 2:4": ("wanda", 0.5, "2:4")}


def _is_router(name: str, lin: nn.Linear) -> bool:
    return lin.out_features == EXPERTS and ("gate" in name or "router" in name)


def prunable(model) -> list[tuple[str, torch.Tensor]]:
    """Every weight the check expects pruned, each as ``[out, in]``: the decoder linears (not the
    LM head or routers) and every expert of every fused expert parameter."""
    head = model.get_output_embeddings()
    out = [(n, m.weight.detach()) for n, m in model.named_modules()
           if isinstance(m, nn.Linear) and m is not head and not _is_router(n, m)]
    for path, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.shape[0] == EXPERTS:
                # [experts, in, out]: transformers' experts modules say so in is_transposed;
                # Llama 4's (which has no such flag) is [experts, in, out] in its source too
                transposed = bool(getattr(module, "is_transposed",
                                          type(module).__name__ == "Llama4TextExperts"))
                out += [(f"{path}.{pname}[{e}]", (w.T if transposed else w).detach())
                        for e, w in enumerate(p)]
    return out


def routers(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()
            if ("gate" in k or "router" in k) and v.dim() == 2 and v.shape[0] == EXPERTS}


def check(out_dir: Path, dense_dir: Path, pattern: str) -> str:
    """'' if the output is right, else what is wrong (short)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    if missing:
        return f"{len(missing)} weights missing on reload (re-initialised), e.g. {sorted(missing)[0]}"
    if unexpected:
        return f"{len(unexpected)} unexpected keys, e.g. {sorted(unexpected)[0]}"
    bad = []
    for name, w in prunable(model):
        zero = w == 0
        if pattern == "0:0":
            ok = abs(int(zero.sum()) - w.numel() // 2) <= w.shape[0]
        else:
            ok = w.shape[1] % 4 == 0 and bool((zero.reshape(w.shape[0], -1, 4).sum(-1) >= 2).all())
        if not ok:
            bad.append(name)
    if bad:
        dense_experts = [b for b in bad if "[" in b]
        what = "experts left dense" if dense_experts and len(dense_experts) == len(bad) else \
            "weights not at the target"
        return f"{len(bad)} {what}, e.g. {bad[0]}"
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    before, after = routers(dense), routers(model)
    if any(not torch.equal(before[k], after[k]) for k in before if k in after):
        return "router changed"
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.isfinite(model(input_ids=ids).logits).all():
            return "non-finite logits"
    return ""


def run_ours(dense_dir: Path, ids: torch.Tensor, method: str, pattern: str, out: Path) -> float:
    from transformers import AutoModelForCausalLM

    import llmprune

    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    recipe = llmprune.PruneRecipe(method, pattern=None if pattern == "0:0" else pattern,
                                  sparsity=0.5 if pattern == "0:0" else None,
                                  nsamples=ids.shape[0], seqlen=ids.shape[1])
    t = time.perf_counter()
    llmprune.prune(model, recipe, calib_ids=ids, progress=False)
    seconds = time.perf_counter() - t
    model.save_pretrained(out)
    return seconds


def run_peer(dense_dir: Path, ids_file: Path, method: str, pattern: str, out: Path) -> float:
    js = out.with_suffix(".json")
    proc = subprocess.run(
        [str(PEER_PY), str(ROOT / "eval" / "peer_llmcompressor.py"), "--model", str(dense_dir),
         "--calib-ids", str(ids_file), "--method", method, "--sparsity", "0.5",
         "--mask-structure", pattern, "--output", str(out), "--json", str(js)],
        capture_output=True, text=True, timeout=PEER_TIMEOUT)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        raise RuntimeError(last[0][:160])
    return json.loads(js.read_text())["prune_seconds"]


def cell(fn, *args) -> dict:
    try:
        seconds = fn(*args[:-1])
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no result within {PEER_TIMEOUT} s"}
    except Exception as exc:  # noqa: BLE001 - a failure is a result here
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    problem = args[-1]()
    return {"ok": not problem, "seconds": round(seconds, 2), **({"error": problem} if problem
                                                               else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(KINDS), help="comma-separated model types")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "eval" / "results" / "bench_families.json"))
    args = ap.parse_args()
    from safetensors.torch import save_file
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if not args.skip_peer:
        subprocess.run(["bash", str(ROOT / "eval" / "peer_setup.sh")], check=True)
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench_families-"))
    ids = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    ids_file = work / "calib.safetensors"
    save_file({"input_ids": ids}, str(ids_file))
    rows = {}
    for t in args.types.split(","):
        dense_dir = work / t / "dense"
        try:
            tiny_family_model(t).save_pretrained(dense_dir)
        except Exception as exc:  # noqa: BLE001
            rows[t] = {"kind": KINDS[t], "build_error": f"{type(exc).__name__}: {exc}"[:160]}
            print(t, "cannot be built:", rows[t]["build_error"], flush=True)
            continue
        row = {"kind": KINDS[t]}
        for label, (method, _, pattern) in RUNS.items():
            out = work / t / f"ours-{method}"
            row[f"ours {label}"] = cell(run_ours, dense_dir, ids, method, pattern, out,
                                        lambda: check(out, dense_dir, pattern))
            if not args.skip_peer:
                pout = work / t / f"peer-{method}"
                row[f"peer {label}"] = cell(run_peer, dense_dir, ids_file, method, pattern, pout,
                                            lambda: check(pout, dense_dir, pattern))
        rows[t] = row
        print(t, json.dumps(row), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if Path(args.json).exists():  # rows of types not run this time are kept
        rows = {**json.loads(Path(args.json).read_text())["types"], **rows}
        rows = {t: rows[t] for t in KINDS if t in rows}
    Path(args.json).write_text(json.dumps(
        {"types": rows, "calibration": {"shape": list(ids.shape), "seed": 0},
         "versions": _versions()}, indent=2) + "\n")
    print(table(rows))


def _versions() -> dict:
    import transformers

    import llmprune

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "llmprune": getattr(llmprune, "__version__", "?"), "python": sys.version.split()[0]}


def table(rows: dict) -> str:
    cols = [f"{who} {label}" for label in RUNS for who in ("ours", "peer")]
    lines = ["| type | kind | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for t, row in rows.items():
        cells = []
        for c in cols:
            r = row.get(c)
            cells.append("" if r is None else f"ok {r['seconds']:.2f} s" if r["ok"]
                         else "FAIL: " + r["error"].replace("|", "/"))
        if "build_error" in row:
            cells = ["cannot build the tiny model"] * len(cols)
        lines.append(f"| {t} | {row['kind']} | " + " | ".join(cells) + " |")
    totals = [sum(1 for row in rows.values() if row.get(c, {}).get("ok")) for c in cols]
    lines.append("| **passed** | | "
                 + " | ".join(f"**{n} / {len(rows)}**" for n in totals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
