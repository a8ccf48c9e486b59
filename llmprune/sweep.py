"""``llmprune sweep``: perplexity over a grid of solvers x sparsities (x allocations).

The model is loaded once; every run starts from a copy of its dense weights, on the same
calibration ids and the same evaluation windows. Writes into ``--output``:

* ``sweep.md``: a markdown table (dense perplexity first);
* ``sweep.json``: every run's recipe, perplexity, measured sparsity and timings;
* ``sweep.png``: perplexity against sparsity, one line per solver (and allocation), log scale;
* ``owl_layers.png``: the per-layer sparsities OWL chose, for runs with ``--allocation owl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .core.errors import UserError


def _plot(runs: list[dict], dense: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    lines: dict[str, list] = {}
    for r in runs:
        label = r["method"] + ("" if r["allocation"] == "uniform" else f" + {r['allocation']}")
        lines.setdefault(label, []).append((r["target_sparsity"], r["perplexity"]))
    for label, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(dense, color="gray", linestyle="--", label=f"dense ({dense:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the decoder linears")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_owl(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    owl = [r for r in runs if r.get("layer_sparsity")]
    fig, ax = plt.subplots(figsize=(7.2, 3.8), dpi=120)
    width = 0.8 / max(len(owl), 1)
    for k, r in enumerate(owl):
        xs = [i + k * width for i in range(len(r["layer_sparsity"]))]
        ax.bar(xs, r["layer_sparsity"], width=width,
               label=f"{r['method']} {r['target_sparsity']:g}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity chosen by OWL")
    ax.set_title("OWL per-layer sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sweep(model_name: str, solvers: list[str], sparsities: list[float], output: str, *,
          pattern: str | None = None, allocations: tuple[str, ...] = ("uniform",),
          nsamples: int = 128, seqlen: int = 2048, calib_data: str | None = None,
          eval_ppl: str = "wikitext2", eval_seqlen: int = 1024, max_windows: int = 16,
          batch_size: int = 4, device: str = "cpu", overwrite: bool = False,
          progress: bool = True) -> dict:
    from .io.data import calibration_ids
    from .engine.prune import needs_calibration, prune
    from .io.data import load_text, tokenize
    from .evaluate.ppl import perplexity
    from .loaders import load_model
    from .io.output import atomic_dir, check_output
    from .recipe import PruneRecipe

    out = check_output(output, overwrite)
    recipes = []
    for method in solvers:
        for alloc in allocations:
            for s in (sparsities if pattern is None or ":" not in pattern else [None]):
                recipes.append(PruneRecipe(method, sparsity=s, pattern=pattern,
                                           nsamples=nsamples, seqlen=seqlen,
                                           calib_data=calib_data, batch_size=batch_size,
                                           device=device, allocation=alloc))
    if not recipes:
        raise UserError("nothing to sweep: give --solvers and --sparsity")
    eval_text = load_text(eval_ppl, "eval")
    model, tokenizer, _ = load_model(model_name)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eval_ids = tokenize(tokenizer, eval_text.text)
    calib = None
    if any(needs_calibration(r) for r in recipes):
        calib, _ = calibration_ids(tokenizer, recipes[0])
    dense = perplexity(model, eval_ids, eval_seqlen, max_windows, device=device,
                       progress=progress)
    runs = []
    for r in recipes:
        model.load_state_dict(dense_state)
        t = time.perf_counter()
        report = prune(model, r, calib_ids=calib if needs_calibration(r) else None,
                       progress=progress)
        seconds = time.perf_counter() - t
        ppl = perplexity(model, eval_ids, eval_seqlen, max_windows, device=device,
                         progress=progress)
        run = {"method": r.method, "target": r.target.label,
               "target_sparsity": r.target.ratio, "allocation": r.allocation,
               "sparsity": report.sparsity, "perplexity": ppl, "prune_seconds": seconds,
               "recipe": r.to_dict()}
        if report.allocation:
            run["layer_sparsity"] = report.allocation["layer_sparsity"]
        runs.append(run)
        print(f"{r.method:>10} {r.allocation:>8} {r.target.label:>6}: perplexity {ppl:.4f} "
              f"({seconds:.1f} s)", flush=True)
    model.load_state_dict(dense_state)

    result = {"model": model_name, "dense_perplexity": dense,
              "eval": {"data": eval_ppl, "seqlen": eval_seqlen, "max_windows": max_windows},
              "calibration": {"nsamples": nsamples, "seqlen": seqlen,
                              "data": calib_data or "wikitext2"},
              "runs": runs}
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "sweep.md").write_text(markdown(result))
        _plot(runs, dense, tmp / "sweep.png",
              f"{model_name}: perplexity against sparsity ({eval_ppl})")
        if any(r.get("layer_sparsity") for r in runs):
            _plot_owl(runs, tmp / "owl_layers.png")
    return result


def markdown(result: dict) -> str:
    ev = result["eval"]
    lines = [f"Perplexity of {result['model']} on {ev['data']} ({ev['max_windows']} windows x "
             f"{ev['seqlen']} tokens); calibration {result['calibration']['nsamples']} x "
             f"{result['calibration']['seqlen']} tokens of {result['calibration']['data']}.", "",
             "| solver | allocation | target | measured sparsity | perplexity | prune s |",
             "|---|---|---|---|---|---|",
             f"| dense | - | 0 | 0 | {result['dense_perplexity']:.3f} | - |"]
    for r in result["runs"]:
        lines.append(f"| {r['method']} | {r['allocation']} | {r['target']} | "
                     f"{r['sparsity']:.4f} | {r['perplexity']:.3f} | {r['prune_seconds']:.1f} |")
    return "\n".join(lines) + "\n"
