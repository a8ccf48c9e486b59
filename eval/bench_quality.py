"""Quality benchmark (issue 22): sparsity against perplexity for every one-shot method.

Protocol (../shared/PROTOCOL.md): smollm2-135m in float32; calibration on the first 32
non-overlapping windows of 512 tokens of WikiText-2 valid.txt, the same token ids for every
method and for the peer; perplexity on two disjoint slices of the non-overlapping 1024-token
windows of test.txt: slice A = windows 0-15 (the protocol's), slice B = windows 16-31.

Methods (``--methods``, comma-separated):

- ``dense``; ``magnitude``, ``wanda``, ``sparsegpt``, ``admm``: llmprune's solvers with their
  defaults, uniform allocation;
- ``best``: the project's best one-shot recipe for the target, recipes/smollm2-135m/best-2of4.yaml
  for N:M targets and best-70.yaml (its solver stage with the sparsity replaced) for
  unstructured ones;
- ``peer``: llm-compressor 0.14's SparseGPT (eval/peer_llmcompressor.py in eval/.peer-venv, made
  by eval/peer_setup.sh) on the same calibration ids;
- any solver with options, ``NAME/key=value/...`` (``admm/iters=12/allocation=owl``), for
  method-selection experiments.

Targets (``--targets``): unstructured ratios and N:M patterns, e.g. ``0.5,2:4,0.6,0.7,0.8``.
Times are wall-clock seconds of the pruning call alone (loaded model -> pruned model) in this
process, one method after another; the machine is shared, so compare times within one run.

    .venv/bin/python eval/bench_quality.py --targets 2:4,0.7 --methods sparsegpt,best,peer
    .venv/bin/python eval/bench_quality.py --plot docs/quality.png   # everything (~1 hour)

Prints a table (markdown) and writes eval/results/bench_quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / "eval" / ".peer-venv" / "bin" / "python"
RECIPES = ROOT / "recipes" / "smollm2-135m"
NSAMPLES, SEQLEN = 32, 512
EVAL_SEQLEN, SLICE_WINDOWS = 1024, 16
DEFAULT_METHODS = "dense,magnitude,wanda,sparsegpt,admm,best,peer"
DEFAULT_TARGETS = "0.5,2:4,0.6,0.7,0.8"


def split_target(target: str) -> tuple[float | None, str | None]:
    """``"2:4"`` -> (None, "2:4"); ``"0.7"`` -> (0.7, None)."""
    return (None, target) if ":" in target else (float(target), None)


def parse_value(text: str):
    return yaml.safe_load(text)


def best_stage(target: str) -> tuple[str, dict]:
    """The solver stage of the best recipe for ``target``: (solver, its keys), the target set."""
    name = "best-2of4.yaml" if ":" in target else "best-70.yaml"
    stage = yaml.safe_load((RECIPES / name).read_text())["stages"][0]
    solver, keys = next(iter(stage.items()))
    keys = dict(keys)
    keys.pop("sparsity", None)
    keys.pop("pattern", None)
    return solver, keys


def method_recipe(method: str, target: str):
    """The PruneRecipe of a method name (see the module docstring) at ``target``."""
    from llmprune.recipe import PruneRecipe

    if method == "best":
        solver, keys = best_stage(target)
    else:
        solver, *pairs = method.split("/")
        keys = {k: parse_value(v) for k, v in (p.split("=", 1) for p in pairs)}
    keys.update(nsamples=NSAMPLES, seqlen=SEQLEN)
    sparsity, pattern = split_target(target)
    if sparsity is not None:
        keys["sparsity"] = sparsity
    else:
        keys["pattern"] = pattern
        keys.pop("allocation", None)  # OWL is unstructured only
    return PruneRecipe.from_stage(solver, keys)


def slices(test_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Slice A: test windows 0-15; slice B: windows 16-31 (disjoint)."""
    n = EVAL_SEQLEN * SLICE_WINDOWS
    return {"A": test_ids[:n], "B": test_ids[n:2 * n]}


def perplexities(model, test_slices) -> dict[str, float]:
    from llmprune.evaluate.ppl import perplexity

    return {k: perplexity(model, ids, EVAL_SEQLEN, SLICE_WINDOWS, progress=False)
            for k, ids in test_slices.items()}


def prunable_sparsity(model) -> float:
    """Zeros over all linears inside the decoder layers (the prunable weights)."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


def run_ours(dense, method: str, target: str, calib: torch.Tensor, test_slices) -> dict:
    import llmprune

    recipe = method_recipe(method, target)
    model = copy.deepcopy(dense)
    t = time.perf_counter()
    llmprune.prune(model, recipe, calib_ids=calib, progress=False)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "sparsity": prunable_sparsity(model),
            "ppl": perplexities(model, test_slices), "recipe": recipe.to_dict()}


def run_peer(ckpt: Path, target: str, calib_file: Path, work: Path, test_slices) -> dict:
    from transformers import AutoModelForCausalLM

    sparsity, pattern = split_target(target)
    out, out_json = work / f"peer-{target.replace(':', 'of')}", work / "peer.json"
    cmd = [str(PEER_PY), str(ROOT / "eval" / "peer_llmcompressor.py"), "--model", str(ckpt),
           "--calib-ids", str(calib_file), "--method", "sparsegpt",
           "--sparsity", str(0.5 if pattern else sparsity),
           "--mask-structure", pattern or "0:0", "--output", str(out), "--json", str(out_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"peer failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    peer = json.loads(out_json.read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return {"seconds": peer.get("prune_seconds"), "sparsity": prunable_sparsity(model),
            "ppl": perplexities(model, test_slices)}


def table(results: dict) -> str:
    """Markdown: one row per (target, method), perplexity on both slices, the ratio to the peer's
    SparseGPT and the time relative to our SparseGPT."""
    lines = ["| target | method | sparsity | ppl A | ppl B | / peer A | / peer B | seconds "
             "| / sparsegpt time |", "|---|---|---|---|---|---|---|---|---|"]
    dense = results.get("dense")
    if dense:
        lines.append(f"| 0 | dense | 0 | {dense['ppl']['A']:.2f} | {dense['ppl']['B']:.2f} "
                     "| | | | |")
    for target, rows in results["targets"].items():
        peer, sg = rows.get("peer"), rows.get("sparsegpt")
        for method, row in rows.items():
            ratio = ["", ""]
            if peer:
                ratio = [f"{row['ppl'][k] / peer['ppl'][k]:.3f}" for k in "AB"]
            rel = f"{row['seconds'] / sg['seconds']:.2f}" if sg and method != "peer" else ""
            lines.append(f"| {target} | {method} | {row['sparsity']:.4f} | {row['ppl']['A']:.2f} "
                         f"| {row['ppl']['B']:.2f} | {ratio[0]} | {ratio[1]} "
                         f"| {row['seconds']:.1f} | {rel} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Sparsity against perplexity (slice A, log scale), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({m for rows in results["targets"].values() for m in rows})
    for method in methods:
        pts = sorted((rows[method]["sparsity"], rows[method]["ppl"]["A"], target)
                     for target, rows in results["targets"].items() if method in rows)
        unstructured = [(s, p) for s, p, t in pts if ":" not in t]
        line, = ax.plot([s for s, _ in unstructured], [p for _, p in unstructured], marker="o",
                        label=method, ls="--" if method == "peer" else "-")  # peer ~ sparsegpt
        for s, p, t in pts:
            if ":" in t:  # N:M targets: one marker of the same colour, not on the line
                ax.scatter([s], [p], marker="s", color=line.get_color())
    if results.get("dense"):
        ax.axhline(results["dense"]["ppl"]["A"], color="grey", ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the decoder linears (squares: 2:4)")
    ax.set_ylabel("WikiText-2 test perplexity (slice A)")
    ax.set_title("smollm2-135m, one-shot, 32 x 512 calibration tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: list[Path]) -> dict:
    """The results of several runs as one (rows of a later file replace an earlier one's; each
    row's file is kept in ``sources``), targets in :data:`DEFAULT_TARGETS` order."""
    merged: dict = {"protocol": None, "targets": {}, "sources": {}}
    for path in paths:
        d = json.loads(path.read_text())
        merged["protocol"] = merged["protocol"] or d["protocol"]
        if d["protocol"]["calib_ids_sha256"] != merged["protocol"]["calib_ids_sha256"]:
            raise SystemExit(f"{path} was calibrated on other token ids")
        if d.get("dense"):
            merged["dense"] = d["dense"]
        for target, rows in d["targets"].items():
            merged["targets"].setdefault(target, {}).update(rows)
            merged["sources"].setdefault(target, {}).update({m: path.name for m in rows})
    order = DEFAULT_TARGETS.split(",")
    merged["targets"] = dict(sorted(merged["targets"].items(),
                                    key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=DEFAULT_TARGETS)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--plot", help="write the sparsity / perplexity plot (PNG) here")
    ap.add_argument("--json", default=str(ROOT / "eval" / "results" / "bench_quality.json"))
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="run nothing: merge these result files of earlier runs (same "
                         "calibration ids; a later file's rows replace an earlier one's), write "
                         "--json, print the table and draw --plot")
    args = ap.parse_args()
    if args.merge:
        results = merge([Path(p) for p in args.merge])
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(table(results))
        if args.plot:
            plot(results, args.plot)
        return

    from safetensors.torch import save_file

    from llmprune.io.data import ids_sha256, load_text, tokenize, windows
    from llmprune.io.loading import smollm2_checkpoint
    from llmprune.loaders import load_model

    ckpt = smollm2_checkpoint()
    dense, tok, _ = load_model(str(ckpt))
    calib = windows(tokenize(tok, load_text("wikitext2", "calib").text), NSAMPLES, SEQLEN)
    test_slices = slices(tokenize(tok, load_text("wikitext2", "eval").text))
    work = Path(tempfile.mkdtemp(prefix="llmprune-quality-"))
    calib_file = work / "calib_ids.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_file))
    methods = args.methods.split(",")
    results = {"protocol": {"model": "smollm2-135m", "calib": [NSAMPLES, SEQLEN],
                            "calib_ids_sha256": ids_sha256(calib),
                            "eval": {"seqlen": EVAL_SEQLEN, "A": "windows 0-15",
                                     "B": "windows 16-31"},
                            "threads": torch.get_num_threads()},
               "targets": {}}
    if "dense" in methods:
        results["dense"] = {"ppl": perplexities(dense, test_slices)}
        print(f"dense: {results['dense']['ppl']}", flush=True)
    if "peer" in methods:
        subprocess.run(["bash", str(ROOT / "eval" / "peer_setup.sh")], check=True)
    for target in args.targets.split(","):
        rows = results["targets"].setdefault(target, {})
        for method in methods:
            if method == "dense":
                continue
            if method == "peer":
                rows[method] = run_peer(ckpt, target, calib_file, work, test_slices)
            else:
                rows[method] = run_ours(dense, method, target, calib, test_slices)
            r = rows[method]
            print(f"{target} {method}: ppl A {r['ppl']['A']:.2f} B {r['ppl']['B']:.2f} "
                  f"sparsity {r['sparsity']:.4f} {r['seconds']:.1f} s", flush=True)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
