"""Golden runs: a fixed set of CLI runs whose outputs are digested tensor by tensor.

The digests were recorded once, before the package was restructured, with
``GOLDEN_RECORD=1 python -m pytest tests/test_golden.py``; without that variable the same test
runs the same commands and requires every digest to match bit for bit.

Each run is the ``llmprune`` command line exactly as a user types it, executed in-process with a
working directory that holds the inputs under fixed relative names, so that no temporary path
reaches an output. The digest of an output directory is:

- for every ``*.safetensors`` file, the sha256 of each tensor's dtype, shape and bytes, and of the
  file's string metadata;
- for every ``*.json`` file, the sha256 of its canonical JSON after dropping the keys that vary
  from run to run (``VOLATILE``);
- for every other file, the sha256 of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DIGESTS = HERE / "digests.json"

# keys of llmprune.json (and of other JSON outputs) whose values differ between identical runs:
# wall-clock times, memory measured in the running process, a random run id; plus every key
# naming "seconds"
VOLATILE = {"timings", "peak_rss_mib"}
# (matched at any depth: a compact export nests the pruning run's metadata)
VOLATILE_PATHS = {"streaming.run_id", "streaming.memory_plan.base",
                  "streaming.memory_plan.total"}

TINY_CALIB = ["--calib-data", "calib.txt", "--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]
REAL_CALIB = ["--calib-data", "valid.txt", "--nsamples", "4", "--seqlen", "128",
              "--batch-size", "4"]


def _solver_runs(model: str, calib: list[str]) -> list[tuple[str, list[str]]]:
    runs = []
    for method in ("sparsegpt", "wanda", "magnitude"):
        runs.append((f"{method}-50", [method, "--model", model, "--sparsity", "0.5", *calib,
                                      "--output", f"out/{method}-50"]))
        runs.append((f"{method}-24", [method, "--model", model, "--pattern", "2:4", *calib,
                                      "--output", f"out/{method}-24"]))
    runs += [
        ("wanda-owl", ["wanda", "--model", model, "--sparsity", "0.5", "--allocation", "owl",
                       *calib, "--output", "out/wanda-owl"]),
        ("sparsegpt-owl-fp32", ["sparsegpt", "--model", model, "--sparsity", "0.6",
                                "--allocation", "owl", "--calib-dtype", "fp32",
                                "--no-true-sequential", *calib, "--output",
                                "out/sparsegpt-owl-fp32"]),
        ("sparsegpt-compact", ["sparsegpt", "--model", model, "--pattern", "2:4", *calib,
                               "--export", "compact", "--output", "out/sparsegpt-compact"]),
        ("export-compact-bf16", ["export", "out/wanda-50", "--format", "compact", "--dtype",
                                 "bf16", "--output", "out/export-compact-bf16"]),
        ("export-dense", ["export", "out/sparsegpt-compact", "--format", "dense", "--output",
                          "out/export-dense"]),
        ("stream-sparsegpt", ["sparsegpt", "--model", model, "--sparsity", "0.5", *calib,
                              "--stream", "--output", "out/stream-sparsegpt"]),
        ("stream-wanda-disk", ["wanda", "--model", model, "--pattern", "2:4", *calib,
                               "--activations-offload", "disk", "--export", "compact",
                               "--output", "out/stream-wanda-disk"]),
        ("structured-magnitude", ["structured", "--model", model, "--sparsity", "0.25",
                                  "--output", "out/structured-magnitude"]),
        ("structured-activation-nonuniform", [
            "structured", "--model", model, "--importance", "activation", "--heads", "0.25",
            "--mlp", "0.3", "--non-uniform", *calib, "--output",
            "out/structured-activation-nonuniform"]),
    ]
    return runs


# (name, argv) in the order they run; later runs may read earlier outputs
TINY_RUNS: list[tuple[str, list[str]]] = _solver_runs("tiny-llama", TINY_CALIB) + [
    ("sparsegpt-opt-50", ["sparsegpt", "--model", "tiny-opt", "--sparsity", "0.5", *TINY_CALIB,
                          "--output", "out/sparsegpt-opt-50"]),
    ("eval-ppl", ["wanda", "--model", "tiny-llama", "--sparsity", "0.3", *TINY_CALIB,
                  "--eval-ppl", "calib.txt", "--eval-seqlen", "32", "--max-windows", "4",
                  "--output", "out/eval-ppl"]),
    ("perp", ["perp", "--model", "out/sparsegpt-50", "--steps", "4", "--batch-size", "2",
              "--seqlen", "32", "--nsamples", "8", "--calib-data", "calib.txt",
              "--output", "out/perp"]),
    ("perp-scalelora-compact", [
        "perp", "--model", "out/wanda-24", "--train", "norms,biases,lora", "--lora-variant",
        "scalelora", "--rank", "2", "--steps", "3", "--batch-size", "2", "--seqlen", "32",
        "--nsamples", "6", "--calib-data", "calib.txt", "--export", "compact",
        "--output", "out/perp-scalelora-compact"]),
    ("dare", ["dare", "--base", "tiny-llama", "--finetuned", "tiny-llama-ft", "--drop", "0.7",
              "--output", "out/dare", "--delta-output", "out/dare-delta"]),
    ("dare-magnitude-darexq", [
        "dare", "--base", "tiny-llama", "--finetuned", "tiny-llama-ft", "--drop", "0.5",
        "--method", "magnitude", "--rescale", "darex-q", "--q-mode", "per-layer",
        "--calib-data", "calib.txt", "--nsamples", "4", "--seqlen", "32",
        "--output", "out/dare-magnitude-darexq"]),
    ("merge-ties", ["merge", "--base", "tiny-llama", "--finetuned", "tiny-llama-ft",
                    "tiny-llama-ft", "--method", "ties", "--drop", "0.3",
                    "--output", "out/merge-ties"]),
    ("bonsai", ["bonsai", "--model", "tiny-llama", "--sparsity", "0.25", "--iterations", "2",
                "--samples", "6", *TINY_CALIB, "--output", "out/bonsai"]),
    ("loraprune", ["loraprune", "--model", "tiny-llama", "--sparsity", "0.25", "--steps", "4",
                   "--prune-steps", "2", *TINY_CALIB, "--output", "out/loraprune"]),
    ("recipe", ["run", "recipe.yaml", "--output", "out/recipe"]),
]

REAL_RUNS: list[tuple[str, list[str]]] = _solver_runs("smollm2-135m", REAL_CALIB)

# the streaming run killed after this layer, then resumed; its output must equal this run's
RESUME_OF = "stream-sparsegpt"
RESUME_KILL_AFTER_LAYER = 1


# ----------------------------------------------------------------------------- inputs
RECIPE_YAML = """\
model: tiny-llama
stages:
  - sparsegpt: {pattern: "2:4", nsamples: 8, seqlen: 32, batch_size: 4, calib_data: calib.txt}
  - export: {format: compact}
"""


def make_tiny_inputs(work: Path) -> None:
    """The tiny checkpoints, a fine-tuned variant for DARE, calibration text and a recipe."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import random_text, tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    for family in ("llama", "opt"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
        model.save_pretrained(work / f"tiny-{family}")
        tok.save_pretrained(work / f"tiny-{family}")
        if family == "llama":
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
            model.save_pretrained(work / "tiny-llama-ft")
            tok.save_pretrained(work / "tiny-llama-ft")
    (work / "calib.txt").write_text(random_text(6000, 2))
    (work / "recipe.yaml").write_text(RECIPE_YAML)


def make_real_inputs(work: Path) -> None:
    """The first 200 lines of wikitext-2's valid.txt (from ../shared, never copied into git)."""
    from llmprune.io.data import find_wikitext2

    src = find_wikitext2() / "valid.txt"
    lines = src.read_text().splitlines(keepends=True)[:200]
    (work / "valid.txt").write_text("".join(lines))


# ----------------------------------------------------------------------------- digests
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _drop_volatile(obj, path: str = ""):
    if isinstance(obj, dict):
        return {k: _drop_volatile(v, f"{path}{k}.") for k, v in obj.items()
                if k not in VOLATILE and "seconds" not in k
                and not any(f".{path}{k}".endswith("." + v) for v in VOLATILE_PATHS)}
    if isinstance(obj, list):
        return [_drop_volatile(v, path) for v in obj]
    return obj


def _tensor_digest(t: torch.Tensor) -> str:
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return _sha(f"{t.dtype}|{tuple(t.shape)}|".encode() + raw)


def digest_dir(path: Path) -> dict[str, str]:
    """{relative file (and tensor) name: sha256} for every file below ``path``."""
    from safetensors import safe_open

    out = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {}
                out[f"{rel}#metadata"] = _sha(json.dumps(meta, sort_keys=True).encode())
                for key in sorted(h.keys()):
                    out[f"{rel}#{key}"] = _tensor_digest(h.get_tensor(key))
        elif f.suffix == ".json":
            data = _drop_volatile(json.loads(f.read_text()))
            out[rel] = _sha(json.dumps(data, sort_keys=True).encode())
        else:
            out[rel] = _sha(f.read_bytes())
    return out


@contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_cli(work: Path, argv: list[str]) -> None:
    from llmprune import cli

    with _cwd(work):
        code = cli.main(["-q", *argv])
    if code != 0:
        raise RuntimeError(f"llmprune {' '.join(argv)} exited {code}")


def outputs_of(argv: list[str]) -> list[str]:
    """The output directories a run writes (``--output`` and ``--delta-output``)."""
    return [argv[i + 1] for i, a in enumerate(argv) if a in ("--output", "--delta-output")]


def crash_then_resume(work: Path, argv: list[str], layer: int) -> None:
    """Run ``argv`` in a child process that is killed with SIGKILL right after decoder layer
    ``layer`` is recorded, then finish it in this process with ``--resume``."""
    child = REPO / "tests" / "fault_child.py"
    proc = subprocess.run([sys.executable, str(child), "kill-after-layer", str(layer), "--",
                           "-q", *argv], cwd=work, capture_output=True, text=True, timeout=600)
    if proc.returncode != -9:
        raise RuntimeError(f"the run to be killed exited {proc.returncode}: {proc.stderr[-2000:]}")
    run_cli(work, [*argv, "--resume"])


def run_all(work: Path, runs: list[tuple[str, list[str]]], progress=print) -> dict:
    """Run every run in ``work`` and return {run name: {file: sha256}}; plus the resumed run."""
    result = {}
    for name, argv in runs:
        progress(f"golden run {name}: llmprune {' '.join(argv)}")
        run_cli(work, argv)
        outs = outputs_of(argv)
        for out in outs:
            key = name if out == outs[0] else f"{name}:{out}"
            result[key] = digest_dir(work / out)
    base = dict(runs)[RESUME_OF]
    resumed = [a if a != f"out/{RESUME_OF}" else "out/resumed" for a in base]
    progress(f"golden run resumed: {RESUME_OF} killed after layer {RESUME_KILL_AFTER_LAYER}")
    crash_then_resume(work, resumed, RESUME_KILL_AFTER_LAYER)
    result["resumed"] = digest_dir(work / "out/resumed")
    return result


def fingerprint() -> dict:
    """What the digests depend on besides llmprune's code."""
    import transformers

    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = next(l for l in cpuinfo.splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "cpu_flags_sha256": _sha(flags.encode())}
