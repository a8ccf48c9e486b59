"""Structured-pruning speed and round-trip benchmark (issue 5, acceptance 2 and 5), on smollm2-135m.

1. Scores heads and MLP channels of smollm2-135m (one-shot baseline, ``--importance magnitude``
   by default: speed does not depend on which groups go, only on how many), selects a **uniform**
   mask with ``--sparsity`` (default 0.4) of the decoder-layer linear parameters removed, shrinks
   it, saves it with ``save_structured`` and reloads it with plain
   ``AutoModelForCausalLM.from_pretrained``.
2. **Round trip**: test perplexity (protocol: WikiText-2 test, 16 windows of 1024) of the shrunk
   model before saving and of the reloaded one -- they must be identical.
3. **Speed**, dense against the reloaded shrunk model, in this one process, interleaved
   (dense, shrunk, dense, shrunk, ...), ``--repeats`` times after one warm-up each; medians:
   * CPU **prefill** tokens/s: batch 1 x 512 tokens (the first 512 tokens of the test text), the
     prefill of a generation: ``model(ids, use_cache=True, logits_to_keep=1)`` -- logits for the
     last position only, as ``generate`` computes them;
   * greedy **decode** tokens/s: ``generate(ids, do_sample=False, max_new_tokens=128,
     min_new_tokens=128)`` after the same 512-token prompt; a logits processor stamps the time of
     every step, and decode tokens/s = 127 / (last stamp - first stamp), i.e. the 127 forward
     passes after the prefill (the prefill is excluded).
   The thread count is torch's default.
3b. The same greedy decode **compiled** (on by default; ``--no-compiled`` skips it): both
   models get transformers' documented fast-generation setup, a static KV cache
   (``cache_implementation="static"``) and ``model.forward = torch.compile(model.forward,
   fullgraph=True)`` (inductor's default mode on CPU), warmed up with one full generation of
   the same prompt (compiles the prefill and decode graphs; reported), then interleaved repeats
   as above. Eager decode of a 135M model on 2 cores carries ~1000 small ops per token whose
   cost does not shrink with the model (and transformers' dynamic cache copies the whole KV
   cache every step); compiling removes most of that fixed cost from both models alike, so the
   compiled ratio is the one that reflects the weights each model reads.
4. The **non-uniform** export (a global ranking, same ``--sparsity``): saved, loaded with
   ``llmprune.load_pretrained``, perplexity before / after, and ``generate()``.
5. An analytic bound: the parameters a forward pass reads per token (decoder linears + lm_head
   for a decode step; the decoder linears only for a prefill with ``logits_to_keep=1``), dense
   over shrunk -- what a perfectly memory/FLOP-bound run could gain -- and a measured one: the
   decode step's linears alone (every decoder-layer ``nn.Linear`` and the lm_head on one
   token, models interleaved), i.e. decode with no attention, KV cache or per-op overhead.

    .venv/bin/python eval/bench_structured_speed.py              # about 10 minutes on 2 cores
    .venv/bin/python eval/bench_structured_speed.py --repeats 3 --sparsity 0.4 --gqa kv
    # on a shared, oversubscribed machine: one thread, this process's CPU seconds
    .venv/bin/python eval/bench_structured_speed.py --threads 1 --clock cpu --speed-only \
        --out eval/results/bench_structured_speed_cpu1.json

Prints the figures and writes eval/results/bench_structured_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVAL_SEQLEN, EVAL_WINDOWS = 1024, 16
PREFILL, NEW_TOKENS = 512, 128


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@torch.no_grad()
def time_prefill(model, ids: torch.Tensor, clock: str = "wall") -> float:
    t = CLOCKS[clock]()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return CLOCKS[clock]() - t


@torch.no_grad()
def time_decode(model, ids: torch.Tensor, clock: str = "wall", cache: str = "dynamic") -> float:
    """Seconds for the decode steps after the prefill (127 forward passes for 128 tokens)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(CLOCKS[clock]())
            return scores

    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         logits_processor=LogitsProcessorList([Stamp()]),
                         pad_token_id=model.config.eos_token_id,
                         **({"cache_implementation": "static"} if cache == "static" else {}))
    assert out.shape[1] - ids.shape[1] == NEW_TOKENS and len(stamps) == NEW_TOKENS
    return stamps[-1] - stamps[0]


def speedups(dense: list[float], shrunk: list[float]) -> tuple[float, list[float], float]:
    """Dense over shrunk seconds: the ratio of the medians, the per-repeat ratios (each pair was
    measured back to back, so they are less exposed to load drift) and the ratio of the bests."""
    return (statistics.median(dense) / statistics.median(shrunk),
            [d / s for d, s in zip(dense, shrunk)], min(dense) / min(shrunk))


def compiled_decode(models: dict, prompt: torch.Tensor, repeats: int, clock: str) -> dict:
    """Greedy decode of every model with a static KV cache and a compiled ``forward`` -- the
    setup transformers documents for fast generation -- interleaved, ``repeats`` times after a
    warm-up generation of the same prompt (which compiles). Restores the eager ``forward`` after."""
    warm = {}
    secs: dict[str, list[float]] = {name: [] for name in models}
    try:
        for name, m in models.items():
            m.forward = torch.compile(m.forward, fullgraph=True)
            t = time.perf_counter()
            time_decode(m, prompt, cache="static")
            warm[name] = time.perf_counter() - t
        print("compiled decode: warm-up (compiling) " + ", ".join(
            f"{n} {s:.0f} s" for n, s in warm.items()), flush=True)
        for r in range(repeats):
            for name, m in models.items():
                secs[name].append(time_decode(m, prompt, clock, cache="static"))
            print(f"compiled repeat {r + 1}/{repeats}: " + ", ".join(
                f"{n} decode {(NEW_TOKENS - 1) / t[-1]:.1f} tok/s" for n, t in secs.items()),
                flush=True)
    finally:  # back to the class's eager forward (deepcopies later must not share the graph)
        for m in models.values():
            m.__dict__.pop("forward", None)
        torch._dynamo.reset()
    out = {name: {"decode_tokens_per_s": (NEW_TOKENS - 1) / statistics.median(t),
                  "best_decode_tokens_per_s": (NEW_TOKENS - 1) / min(t), "decode_seconds": t}
           for name, t in secs.items()}
    x, pair, best = speedups(secs["dense"], secs["shrunk"])
    print(f"decode, compiled + static cache: dense {out['dense']['decode_tokens_per_s']:.1f} "
          f"tok/s, shrunk {out['shrunk']['decode_tokens_per_s']:.1f} tok/s -> {x:.2f}x "
          f"(median of per-repeat ratios {statistics.median(pair):.2f}x, best-of "
          f"{best:.2f}x)", flush=True)
    return {**out, "decode_speedup": x, "decode_speedup_per_repeat": pair,
            "decode_speedup_median_of_pairs": statistics.median(pair),
            "decode_speedup_of_best": best, "warmup_seconds": warm, "goal": 1.4,
            "goal_met": x >= 1.4,
            "setup": "generate() as in 'speed' with cache_implementation='static' and "
                     "model.forward = torch.compile(model.forward, fullgraph=True) on both "
                     f"models; medians of {repeats} interleaved repeats after one warm-up "
                     f"generation each; clock: {clock}; torch threads: "
                     f"{torch.get_num_threads()}"}


@torch.no_grad()
def time_linears(models: dict, iters: int = 30, clock: str = "wall") -> dict:
    """The decode step's matrix-vector products alone: every ``nn.Linear`` of the decoder layers
    and the lm_head applied once to a one-token input, models interleaved, ``iters`` times.
    What a decode step would cost with no attention, no KV cache and no per-op overhead -- the
    ceiling of the decode speed-up on this machine. Medians and minimums of the seconds."""
    from torch import nn

    work = {}
    for name, m in models.items():
        lins = [x for layer in m.model.layers for x in layer.modules() if isinstance(x, nn.Linear)]
        lins.append(m.get_output_embeddings())
        work[name] = [(x, torch.randn(1, 1, x.in_features)) for x in lins]
    secs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(iters):
        for name, pairs in work.items():
            t = CLOCKS[clock]()
            for lin, x in pairs:
                lin(x)
            secs[name].append(CLOCKS[clock]() - t)
    x, _, best = speedups(secs["dense"], secs["shrunk"])
    return {"median_seconds": {n: statistics.median(v) for n, v in secs.items()},
            "min_seconds": {n: min(v) for n, v in secs.items()},
            "speedup_of_medians": x, "speedup_of_best": best,
            "note": f"every decoder-layer nn.Linear + lm_head on one token, {iters} interleaved "
                    "iterations: the decode speed-up with no attention, KV cache or per-op cost"}


def decoder_linear_params(model) -> int:
    from llmprune.structured.shrink import layer_groups

    return sum(g.total_params for g in layer_groups(model))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--heads", type=float, default=None)
    ap.add_argument("--mlp", type=float, default=None)
    ap.add_argument("--gqa", choices=["even", "kv"], default="even")
    ap.add_argument("--importance", choices=["magnitude", "activation"], default="magnitude")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-nonuniform", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's default, the protocol)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: wall-clock seconds (the protocol); cpu: this process's CPU "
                         "seconds (time.process_time), which other processes on a shared "
                         "machine do not inflate -- meaningful with --threads 1")
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                    help="KV cache of generate(): dynamic (transformers' default: grows by "
                         "concatenation, copying the cache every step) or static "
                         "(cache_implementation='static': preallocated, written in place)")
    ap.add_argument("--no-compiled", action="store_true",
                    help="skip the compiled decode (static KV cache + torch.compile of "
                         "model.forward for both models, after the eager measurements)")
    ap.add_argument("--speed-only", action="store_true",
                    help="skip the perplexity round trips and the non-uniform export")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench_structured_speed.json"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import llmprune
    from llmprune.structured import shrink as S
    from llmprune.io.data import load_text, tokenize, windows
    from llmprune.evaluate.ppl import perplexity
    from llmprune.loaders import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tok, _ = load_model("smollm2-135m", dtype=torch.float32)
    eval_ids = tokenize(tok, load_text("wikitext2", "eval").text)
    calib = None
    if args.importance == "activation":  # protocol calibration: first 32 windows of 512
        calib = windows(tokenize(tok, load_text("wikitext2", "calib").text), 32, 512)
    target = dict(sparsity=args.sparsity, heads=args.heads, mlp=args.mlp, gqa=args.gqa)
    if args.heads is not None and args.mlp is not None:
        target["sparsity"] = None
    result: dict = {"load_average_at_start": os.getloadavg(), "model": "smollm2-135m", "dtype": "float32", "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cache": args.cache, "machine": platform.processor() or
                    platform.machine(), "importance": args.importance, "target": target,
                    "command": " ".join(["eval/bench_structured_speed.py", *sys.argv[1:]]),
                    "env": {k: v for k, v in os.environ.items()
                            if k.startswith(("TRANSFORMERS_SDPA", "OMP_", "MKL_"))}}
    dense_params = decoder_linear_params(dense)
    lm_head = dense.get_output_embeddings().weight.numel()

    work = Path(tempfile.mkdtemp(prefix="bench_structured_"))
    t = time.perf_counter()
    mask, summary = S.prune_structured(dense, importance=args.importance, uniform=True,
                                       calib_ids=calib, progress=False, **target)
    result["prune_seconds"] = time.perf_counter() - t
    import copy

    shrunk = copy.deepcopy(dense)
    S.shrink_(shrunk, mask)
    layer0 = summary["layers"][0]
    result["uniform"] = {"removed_fraction": summary["removed_fraction"],
                         "widths": {k: layer0[k] for k in
                                    ("n_heads", "n_kv_heads", "intermediate_size")},
                         "of": layer0["of"]}
    print(f"uniform mask: removed {summary['removed_fraction']:.4f} of decoder-layer linear "
          f"params; per layer {layer0['n_heads']}/{layer0['of']['n_heads']} heads, "
          f"{layer0['n_kv_heads']}/{layer0['of']['n_kv_heads']} KV heads, "
          f"{layer0['intermediate_size']}/{layer0['of']['intermediate_size']} channels", flush=True)

    # -- round trip (uniform): shrunk in memory -> save -> plain from_pretrained
    ppl_before = (float("nan") if args.speed_only else
                  perplexity(shrunk, eval_ids, EVAL_SEQLEN, EVAL_WINDOWS, progress=False))
    out_dir = work / "uniform"
    info = S.save_structured(copy.deepcopy(dense), tok, out_dir, mask,
                             {"method": "structured-baseline", "importance": args.importance})
    assert info["loads_with"] == "AutoModelForCausalLM.from_pretrained", info["loads_with"]
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ppl_after = (float("nan") if args.speed_only else
                 perplexity(reloaded, eval_ids, EVAL_SEQLEN, EVAL_WINDOWS, progress=False))
    result["round_trip_uniform"] = {"ppl_shrunk_in_memory": ppl_before,
                                    "ppl_reloaded_from_pretrained": ppl_after,
                                    "identical": ppl_before == ppl_after,
                                    "config": {k: getattr(reloaded.config, k) for k in (
                                        "num_attention_heads", "num_key_value_heads",
                                        "head_dim", "intermediate_size")}}
    if args.speed_only:
        result["round_trip_uniform"] = {"skipped": "--speed-only"}
        print("round trip (uniform): skipped (--speed-only)", flush=True)
    else:
        print(f"round trip (uniform, plain from_pretrained): perplexity {ppl_before:.6f} before "
              f"save, {ppl_after:.6f} after reload (identical: {ppl_before == ppl_after})",
              flush=True)
    del shrunk

    # -- speed, interleaved
    prompt = eval_ids[:PREFILL].unsqueeze(0)
    shrunk_params = decoder_linear_params(reloaded)
    models = {"dense": dense, "shrunk": reloaded}
    for m in models.values():  # warm-up
        time_prefill(m, prompt)
        time_decode(m, prompt[:, :64], cache=args.cache)
    times = {name: {"prefill": [], "decode": []} for name in models}
    for r in range(args.repeats):
        for name, m in models.items():
            times[name]["prefill"].append(time_prefill(m, prompt, args.clock))
            times[name]["decode"].append(time_decode(m, prompt, args.clock, args.cache))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} prefill {PREFILL / t['prefill'][-1]:.0f} tok/s decode "
            f"{(NEW_TOKENS - 1) / t['decode'][-1]:.1f} tok/s" for n, t in times.items()),
            flush=True)
    speed = {}
    for name, t in times.items():
        speed[name] = {"prefill_tokens_per_s": PREFILL / statistics.median(t["prefill"]),
                       "decode_tokens_per_s": (NEW_TOKENS - 1) / statistics.median(t["decode"]),
                       "best_prefill_tokens_per_s": PREFILL / min(t["prefill"]),
                       "best_decode_tokens_per_s": (NEW_TOKENS - 1) / min(t["decode"]),
                       "prefill_seconds": t["prefill"], "decode_seconds": t["decode"]}
    prefill_x, pair_prefill, best_prefill = speedups(times["dense"]["prefill"],
                                                     times["shrunk"]["prefill"])
    decode_x, pair_decode, best_decode = speedups(times["dense"]["decode"],
                                                  times["shrunk"]["decode"])
    result["speed"] = {**speed, "prefill_speedup": prefill_x, "decode_speedup": decode_x,
                       "prefill_speedup_of_best": best_prefill,
                       "decode_speedup_of_best": best_decode,
                       "prefill_speedup_per_repeat": pair_prefill,
                       "decode_speedup_per_repeat": pair_decode,
                       "goal": 1.4, "goal_met": {"prefill": prefill_x >= 1.4,
                                                 "decode": decode_x >= 1.4},
                       "setup": f"batch 1 x {PREFILL} prompt tokens; prefill = forward with "
                                "use_cache=True, logits_to_keep=1; decode = the "
                                f"{NEW_TOKENS - 1} greedy steps after the prefill of "
                                f"generate(max_new_tokens={NEW_TOKENS}, "
                                f"min_new_tokens={NEW_TOKENS}, do_sample=False); medians of "
                                f"{args.repeats} interleaved repeats; clock: {args.clock}; "
                                f"torch threads: {torch.get_num_threads()}"}
    # what a purely parameter-bound run could gain (per token: decoder linears (+ lm_head))
    result["bound"] = {
        "decoder_linear_params": {"dense": dense_params, "shrunk": shrunk_params},
        "lm_head_params": lm_head,
        "prefill_param_ratio": dense_params / shrunk_params,
        "decode_param_ratio": (dense_params + lm_head) / (shrunk_params + lm_head),
        "note": "a decode step reads every decoder linear and the (tied) lm_head; a "
                "logits_to_keep=1 prefill runs lm_head on one position only"}
    result["bound"]["linears_only"] = lin = time_linears(models, clock=args.clock)
    print(f"decode step's linears alone (no attention / cache / overhead): dense "
          f"{lin['median_seconds']['dense'] * 1e3:.1f} ms, shrunk "
          f"{lin['median_seconds']['shrunk'] * 1e3:.1f} ms -> {lin['speedup_of_medians']:.2f}x "
          f"(best-of {lin['speedup_of_best']:.2f}x)", flush=True)
    print(f"prefill: dense {speed['dense']['prefill_tokens_per_s']:.0f} tok/s, shrunk "
          f"{speed['shrunk']['prefill_tokens_per_s']:.0f} tok/s -> {prefill_x:.2f}x "
          f"(parameter bound {result['bound']['prefill_param_ratio']:.2f}x)")
    print(f"decode:  dense {speed['dense']['decode_tokens_per_s']:.1f} tok/s, shrunk "
          f"{speed['shrunk']['decode_tokens_per_s']:.1f} tok/s -> {decode_x:.2f}x "
          f"(parameter bound {result['bound']['decode_param_ratio']:.2f}x: lm_head "
          f"{lm_head / 1e6:.1f}M params stays)", flush=True)
    print(f"best-of-{args.repeats}: prefill {result['speed']['prefill_speedup_of_best']:.2f}x, "
          f"decode {result['speed']['decode_speedup_of_best']:.2f}x; load average now "
          f"{os.getloadavg()}", flush=True)
    if not args.no_compiled:
        result["speed_compiled"] = compiled_decode(models, prompt, args.repeats, args.clock)
    del reloaded

    # -- non-uniform: save -> llmprune.load_pretrained -> perplexity + generate
    if not (args.skip_nonuniform or args.speed_only):
        mask_nu, summary_nu = S.prune_structured(dense, importance=args.importance,
                                                 uniform=False, calib_ids=calib,
                                                 progress=False, **target)
        shrunk_nu = copy.deepcopy(dense)
        S.shrink_(shrunk_nu, mask_nu)
        ppl_nu = perplexity(shrunk_nu, eval_ids, EVAL_SEQLEN, EVAL_WINDOWS, progress=False)
        nu_dir = work / "nonuniform"
        info = S.save_structured(copy.deepcopy(dense), tok, nu_dir, mask_nu,
                                 {"method": "structured-baseline", "importance": args.importance})
        try:
            AutoModelForCausalLM.from_pretrained(nu_dir)
            plain_error = None
        except Exception as exc:  # noqa: BLE001 - we record what a plain load says
            plain_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        loaded = llmprune.load_pretrained(nu_dir)
        ppl_nu_after = perplexity(loaded, eval_ids, EVAL_SEQLEN, EVAL_WINDOWS, progress=False)
        gen = loaded.generate(prompt[:, :32], attention_mask=torch.ones_like(prompt[:, :32]),
                              do_sample=False, max_new_tokens=24,
                              pad_token_id=loaded.config.eos_token_id)
        widths = [(x["n_heads"], x["intermediate_size"]) for x in summary_nu["layers"]]
        result["round_trip_nonuniform"] = {
            "removed_fraction": summary_nu["removed_fraction"], "loads_with": info["loads_with"],
            "per_layer_heads_channels": widths,
            "ppl_shrunk_in_memory": ppl_nu, "ppl_load_pretrained": ppl_nu_after,
            "identical": ppl_nu == ppl_nu_after,
            "plain_from_pretrained_error": plain_error,
            "generate_ok": gen.shape[1] == 32 + 24,
            "generated_text": tok.decode(gen[0, 32:])}
        print(f"non-uniform: removed {summary_nu['removed_fraction']:.4f}; perplexity "
              f"{ppl_nu:.6f} in memory, {ppl_nu_after:.6f} after llmprune.load_pretrained "
              f"(identical: {ppl_nu == ppl_nu_after}); generate() -> "
              f"{tok.decode(gen[0, 32:])!r}")
        print(f"plain from_pretrained on it: {plain_error}")

    import shutil

    shutil.rmtree(work, ignore_errors=True)
    result["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
