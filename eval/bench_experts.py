"""Whole-expert pruning benchmark (issue 20): REAP against routing frequency and random experts.

No released mixture-of-experts checkpoint can be downloaded on our build machines, and a tiny
random MoE has no meaningful routing, so this script trains its own small Mixtral-style model
on CPU and prunes that. It is a small model trained here for a few minutes, not a released
checkpoint: what it shows about REAP and frequency may not hold on released MoEs.

Protocol:

- data: WikiText-2 valid.txt is split at the line boundary nearest 90% of its characters; the
  first part trains a byte-level BPE tokenizer (``tokenizers``, 4096 tokens) and the model, the
  last part (never seen in training) is the calibration text of the pruning; test.txt is used for
  perplexity only;
- model: ``MixtralConfig`` (4 layers, hidden 192, 4 heads, 8 experts of intermediate size 384,
  top-2, tied embeddings), ``AutoModelForCausalLM.from_config``, seed 0, float32; AdamW
  (lr 2e-3, betas 0.9/0.95, weight decay 0.1, 30 warm-up steps then cosine to 10%, gradient
  clipping 1.0) for ``--steps`` steps of 8 random 256-token windows of the training ids, with
  Mixtral's load-balancing loss on (``output_router_logits=True``, ``router_aux_loss_coef``
  0.01). The trained model is cached in ``--workdir``; a re-run with the same settings skips
  training;
- pruning: for every keep ratio, ``llmprune.runs.experts.experts_checkpoint`` (what
  ``llmprune experts`` runs) with ``--saliency reap`` and ``--saliency frequency`` on the same
  calibration ids (the first 32 consecutive 256-token windows of the held-out text); the
  ``random`` row keeps ``round(keep_ratio * 8)`` experts drawn uniformly per layer, chosen here
  in the benchmark (``--random-draws`` draws, seeds ``100 * kept + d``), and removes the others
  with the library's slicing (``llmprune.structured.experts.remove_experts``), so it differs
  from the other rows in the selection alone; its perplexities are the median of the draws, with
  their range;
- evaluation: every output is reloaded with plain ``AutoModelForCausalLM.from_pretrained``
  (no missing or unexpected keys, the config's expert count and the router's rows checked);
  perplexity on two disjoint slices of the non-overlapping 256-token windows of test.txt:
  slice A = windows 0-127, slice B = windows 128-255.

Seconds are the pruning call alone (saliency and slicing: ``llmprune.json``'s
``timings.prune``), on one thread of the shared machine.

    .venv/bin/python eval/bench_experts.py                 # ~10 minutes (training ~5 of them)
    .venv/bin/python eval/bench_experts.py --ratios 0.5 --saliencies reap,frequency

Prints a table (markdown) and writes eval/results/bench_experts.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096
SPECIAL = "<|endoftext|>"
TRAIN_FRACTION = 0.9
SEQLEN, BATCH = 256, 8
NCALIB = 32
EVAL_WINDOWS = 128  # per slice
MODEL = {"hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 8,
         "num_experts_per_tok": 2, "max_position_embeddings": 512,
         "tie_word_embeddings": True, "output_router_logits": True,
         "router_aux_loss_coef": 0.01}
OPTIM = {"lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "warmup": 30,
         "final_lr_fraction": 0.1, "clip": 1.0}
DEFAULT_STEPS = 360
SALIENCIES = ("reap", "frequency", "random")


def split_valid(text: str, fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """(training text, held-out text): ``text`` cut at the line boundary nearest ``fraction`` of
    its characters."""
    cut = round(len(text) * fraction)
    after, before = text.find("\n", cut), text.rfind("\n", 0, cut)
    candidates = [i + 1 for i in (before, after) if i >= 0]
    at = min(candidates, key=lambda i: abs(i - cut))
    return text[:at], text[at:]


def train_tokenizer(text: str, vocab: int = VOCAB):
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on ``text``, as a transformers
    fast tokenizer (``SPECIAL`` is its BOS, EOS and pad token; nothing is added on encoding)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text.splitlines(keepends=True), vocab_size=vocab, min_frequency=2,
                            special_tokens=[SPECIAL], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=SPECIAL,
                                   eos_token=SPECIAL, pad_token=SPECIAL)


def wikitext2() -> tuple[Path, Path]:
    """valid.txt and test.txt of the local WikiText-2 (llmprune's search path)."""
    from llmprune.io.data import find_wikitext2

    found = find_wikitext2()
    if found is None:
        raise SystemExit("WikiText-2 not found: set LLMPRUNE_WIKITEXT2_DIR to a folder with "
                         "valid.txt and test.txt")
    return found / "valid.txt", found / "test.txt"


def settings_key(steps: int) -> str:
    """What the cached model depends on (data, sizes, optimiser, steps, library versions)."""
    import tokenizers
    import transformers

    blob = json.dumps({"model": MODEL, "optim": OPTIM, "steps": steps, "vocab": VOCAB,
                       "seqlen": SEQLEN, "batch": BATCH, "fraction": TRAIN_FRACTION,
                       "valid": hashlib.sha256(wikitext2()[0].read_bytes()).hexdigest(),
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "tokenizers": tokenizers.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lr_at(step: int, steps: int) -> float:
    """Linear warm-up over ``OPTIM['warmup']`` steps, then cosine to the final fraction."""
    base, warm, floor = OPTIM["lr"], OPTIM["warmup"], OPTIM["final_lr_fraction"]
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(tokenizer, ids: torch.Tensor, steps: int, seed: int = 0, log_every: int = 40):
    """Train the Mixtral-style model on random ``SEQLEN`` windows of ``ids``; returns the model
    and a log (seconds, loss and aux loss every ``log_every`` steps)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    tid = tokenizer.convert_tokens_to_ids(SPECIAL)
    config = MixtralConfig(vocab_size=len(tokenizer), bos_token_id=tid, eos_token_id=tid,
                           pad_token_id=tid, **MODEL)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM["weight_decay"]},
                             {"params": other, "weight_decay": 0.0}],
                            lr=OPTIM["lr"], betas=tuple(OPTIM["betas"]))
    gen = torch.Generator().manual_seed(seed)
    log, t = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        starts = torch.randint(0, ids.numel() - SEQLEN, (BATCH,), generator=gen)
        batch = torch.stack([ids[s:s + SEQLEN] for s in starts.tolist()])
        out = model(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            row = {"step": step, "loss": round(out.loss.item(), 4),
                   "aux_loss": round(out.aux_loss.item(), 4),
                   "seconds": round(time.perf_counter() - t, 1)}
            log.append(row)
            print(f"train {row}", flush=True)
    model.eval()
    model.config.output_router_logits = False  # inference: no router logits in the outputs
    return model, {"seconds": time.perf_counter() - t, "log": log}


def trained_model(workdir: Path, steps: int) -> tuple[Path, Path, dict]:
    """The trained model's directory, the held-out calibration text file and the training
    record: read from ``workdir`` when the settings match, else trained and written there."""
    from llmprune.io.data import tokenize

    key = settings_key(steps)
    model_dir, calib_file, record_file = (workdir / f"model-{key}", workdir / "calib.txt",
                                          workdir / f"model-{key}" / "train.json")
    if record_file.is_file() and calib_file.is_file():
        print(f"trained model cached in {model_dir}", flush=True)
        return model_dir, calib_file, dict(json.loads(record_file.read_text()),
                                           trained_this_run=False)
    train_text, held_out = split_valid(wikitext2()[0].read_text(encoding="utf-8"))
    t = time.perf_counter()
    tokenizer = train_tokenizer(train_text)
    tok_seconds = time.perf_counter() - t
    train_ids = tokenize(tokenizer, train_text)
    held_ids = tokenize(tokenizer, held_out)
    print(f"tokenizer: {len(tokenizer)} tokens, {tok_seconds:.1f} s; valid.txt: "
          f"{train_ids.numel()} training tokens, {held_ids.numel()} held out", flush=True)
    torch.manual_seed(0)
    model, log = train(tokenizer, train_ids, steps)
    record = {"settings_key": key, "model": MODEL, "optim": OPTIM, "steps": steps,
              "batch": [BATCH, SEQLEN], "tokens_seen": steps * BATCH * SEQLEN,
              "train_tokens": train_ids.numel(), "held_out_tokens": held_ids.numel(),
              "held_out_fraction": held_ids.numel() / (train_ids.numel() + held_ids.numel()),
              "tokenizer_seconds": tok_seconds, "train_seconds": log["seconds"],
              "threads": torch.get_num_threads(), "log": log["log"],
              "parameters": sum(p.numel() for p in model.parameters()),
              "expert_parameters": sum(p.numel() for n, p in model.named_parameters()
                                       if ".experts." in n)}
    workdir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calib_file.write_text(held_out, encoding="utf-8")
    record_file.write_text(json.dumps(record, indent=2))
    return model_dir, calib_file, dict(record, trained_this_run=True)


def slices(test_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Slice A: test windows 0-127; slice B: windows 128-255 (disjoint)."""
    n = SEQLEN * EVAL_WINDOWS
    if test_ids.numel() < 2 * n:
        raise SystemExit(f"test.txt has {test_ids.numel()} tokens, fewer than 2 x {n}")
    return {"A": test_ids[:n], "B": test_ids[n:2 * n]}


def perplexities(model, test_slices) -> dict[str, float]:
    from llmprune.evaluate.ppl import perplexity

    return {k: perplexity(model, ids, SEQLEN, EVAL_WINDOWS, batch_size=8, progress=False)
            for k, ids in test_slices.items()}


def reload_checked(path: Path, experts: int):
    """``AutoModelForCausalLM.from_pretrained(path)``, refusing missing or unexpected weights and
    any MoE layer whose expert or router count is not ``experts``."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                       output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise SystemExit(f"{path}: reload is not clean: {info}")
    if model.config.num_local_experts != experts:
        raise SystemExit(f"{path}: config has {model.config.num_local_experts} experts, "
                         f"expected {experts}")
    for i, layer in enumerate(model.model.layers):
        moe = layer.mlp
        shapes = (moe.gate.weight.shape[0], moe.experts.gate_up_proj.shape[0],
                  moe.experts.down_proj.shape[0])
        if set(shapes) != {experts}:
            raise SystemExit(f"{path}: layer {i} router / experts rows {shapes}, "
                             f"expected {experts}")
    return model.eval()


def random_keep(layers: int, experts: int, keep: int, seed: int) -> list[torch.Tensor]:
    """``keep`` experts per layer drawn uniformly without replacement, in increasing order."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(experts, generator=gen)[:keep].sort().values for _ in range(layers)]


def run_library(model_dir: Path, calib_file: Path, out: Path, ratio: float,
                saliency: str) -> dict:
    """``llmprune experts`` through its Python entry point; returns its llmprune.json."""
    from llmprune.runs.experts import experts_checkpoint

    return experts_checkpoint(str(model_dir), str(out), keep_ratio=ratio, saliency=saliency,
                              nsamples=NCALIB, seqlen=SEQLEN, calib_data=str(calib_file),
                              batch_size=4, overwrite=True, progress=False)


def run_random(model_dir: Path, out: Path, ratio: float, draw: int) -> dict:
    """Random draw ``draw`` of the random-expert baseline, written like the library's outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.structured.experts import kept_count, remove_experts

    shutil.rmtree(out, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n = model.config.num_local_experts
    keep = kept_count(n, ratio)
    t = time.perf_counter()
    summary = remove_experts(model, random_keep(model.config.num_hidden_layers, n, keep,
                                                seed=100 * keep + draw))
    seconds = time.perf_counter() - t
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return {"experts": summary, "timings": {"prune": seconds}}


def median_row(draws: list[dict]) -> dict:
    """The random baseline's row: per slice the median perplexity of ``draws`` and its range."""
    row = {"experts_after": draws[0]["experts_after"],
           "seconds": statistics.median(d["seconds"] for d in draws), "draws": draws,
           "ppl": {}, "ppl_range": {}}
    for k in draws[0]["ppl"]:
        values = [d["ppl"][k] for d in draws]
        row["ppl"][k] = statistics.median(values)
        row["ppl_range"][k] = [min(values), max(values)]
    return row


def overlap(a: dict, b: dict) -> float:
    """Mean over layers of |kept_a & kept_b| / |kept_a|."""
    return sum(len(set(a[k]) & set(b[k])) / len(a[k]) for k in a) / len(a)


def routing_summary(meta: dict) -> list[dict]:
    """Per layer: the calibration tokens' routing counts and their max / min ratio."""
    rows = []
    for layer, counts in enumerate(meta["saliency"]["frequency"]):
        rows.append({"layer": layer, "frequency": counts,
                     "max_over_min": max(counts) / max(min(counts), 1),
                     "reap": meta["saliency"]["reap"][layer]})
    return rows


def table(results: dict) -> str:
    """Markdown: the dense model, then one row per (keep ratio, saliency)."""
    lines = ["| keep ratio | experts kept | saliency | ppl A | ppl B | seconds |",
             "|---|---|---|---|---|---|"]
    d = results["dense"]
    lines.append(f"| 1.0 | {d['experts']} | dense | {d['ppl']['A']:.2f} | {d['ppl']['B']:.2f} "
                 "| |")
    for ratio, rows in results["ratios"].items():
        for saliency, row in rows.items():
            ppl = [f"{row['ppl'][k]:.2f}" for k in "AB"]
            if "ppl_range" in row:
                ppl = [f"{p} ({lo:.0f}-{hi:.0f})" for p, (lo, hi) in
                       zip(ppl, (row["ppl_range"][k] for k in "AB"))]
                saliency = f"random, median of {len(row['draws'])}"
            lines.append(f"| {ratio} | {row['experts_after']} | {saliency} | {ppl[0]} "
                         f"| {ppl[1]} | {row['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "llmprune-experts"),
                    help="where the trained model and the pruned outputs go (the model is "
                         "reused by later runs with the same settings)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps")
    ap.add_argument("--ratios", default="0.75,0.5,0.375,0.25",
                    help="comma-separated keep ratios")
    ap.add_argument("--saliencies", default=",".join(SALIENCIES),
                    help="comma-separated, of reap, frequency, random")
    ap.add_argument("--random-draws", type=int, default=5,
                    help="seeded draws of the random baseline per keep ratio")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", default=str(ROOT / "eval" / "results" / "bench_experts.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading / shard writing bars, once per row
    saliencies = args.saliencies.split(",")
    unknown = set(saliencies) - set(SALIENCIES)
    if unknown:
        raise SystemExit(f"unknown saliencies {sorted(unknown)}; choose from {SALIENCIES}")

    from transformers import AutoTokenizer

    from llmprune.io.data import ids_sha256, tokenize, windows
    from llmprune.structured.experts import kept_count

    start = time.perf_counter()
    workdir = Path(args.workdir)
    model_dir, calib_file, record = trained_model(workdir, args.steps)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib_ids = windows(tokenize(tokenizer, calib_file.read_text(encoding="utf-8")), NCALIB,
                        SEQLEN)
    test_slices = slices(tokenize(tokenizer, wikitext2()[1].read_text(encoding="utf-8")))
    n = MODEL["num_local_experts"]
    dense = reload_checked(model_dir, n)
    results = {"protocol": {"model": "Mixtral-style MoE trained here (see training)",
                            "calib": [NCALIB, SEQLEN], "calib_ids_sha256": ids_sha256(calib_ids),
                            "eval": {"seqlen": SEQLEN, "A": f"windows 0-{EVAL_WINDOWS - 1}",
                                     "B": f"windows {EVAL_WINDOWS}-{2 * EVAL_WINDOWS - 1}"},
                            "threads": torch.get_num_threads()},
               "training": record,
               "dense": {"experts": n, "ppl": perplexities(dense, test_slices)},
               "ratios": {}}
    del dense
    print(f"dense: {results['dense']['ppl']}", flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        rows = results["ratios"].setdefault(str(ratio), {})
        keep = kept_count(n, ratio)
        for saliency in saliencies:
            draws = []
            for draw in range(args.random_draws if saliency == "random" else 1):
                out = workdir / f"pruned-{ratio}-{saliency}"
                if saliency == "random":
                    meta = run_random(model_dir, out, ratio, draw)
                else:
                    meta = run_library(model_dir, calib_file, out, ratio, saliency)
                    if meta["calibration"]["ids_sha256"] != results["protocol"][
                            "calib_ids_sha256"]:
                        raise SystemExit(f"{saliency} at {ratio} calibrated on other ids: "
                                         f"{meta['calibration']}")
                    results.setdefault("routing", routing_summary(meta))
                model = reload_checked(out, keep)
                r = {"experts_after": keep, "seconds": meta["timings"]["prune"],
                     "kept": meta["experts"]["kept"], "ppl": perplexities(model, test_slices)}
                draws.append(r)
                print(f"{ratio} {saliency}: ppl A {r['ppl']['A']:.2f} B {r['ppl']['B']:.2f} "
                      f"{r['seconds']:.2f} s kept {r['kept']}", flush=True)
            rows[saliency] = median_row(draws) if saliency == "random" else draws[0]
        if "reap" in rows and "frequency" in rows:
            rows["reap"]["kept_overlap_with_frequency"] = overlap(rows["reap"]["kept"],
                                                                  rows["frequency"]["kept"])
        results["total_seconds"] = time.perf_counter() - start
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"total {results['total_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
