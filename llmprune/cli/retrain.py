"""``perp``: retraining a pruned model."""

from __future__ import annotations

from .common import EXPORT_DTYPE, OVERWRITE, Command, config_from_args, eval_flags, flag, positive


PERP_FLAGS = (
    flag("--model", required=True,
         help="a pruned checkpoint: the --output directory of 'llmprune "
              "magnitude|wanda|sparsegpt' (holds llmprune_masks.safetensors)"),
    flag("--train", default="norms,lora",
         help="comma list of what is trained: norms (LayerNorm/RMSNorm weights), "
              "biases (every bias), lora (adapters on the pruned linears)"),
    flag("--lora-variant", choices=["masklora", "scalelora"], default="masklora",
         help="masklora: W + (alpha/rank B A) * M, the LoRA delta masked (starts at 0, "
              "LoRA's usual rank/alpha/lr carry over); scalelora: (B A) * W, "
              "initialised to B A = 1 (rank 1 = scaling rows and columns)"),
    flag("--rank", type=positive, default=8, help="LoRA rank"),
    flag("--alpha", type=float, default=16.0,
         help="LoRA alpha; MaskLoRA's delta is scaled by alpha/rank (ScaleLoRA "
              "ignores it)"),
    flag("--steps", type=positive, default=200, help="optimizer steps (AdamW)"),
    flag("--lr", type=float, default=3e-4,
         help="peak learning rate (linear warm-up over 10%% of the steps, then "
              "linear decay to 0)"),
    flag("--batch-size", type=positive, default=4, help="sequences per step"),
    flag("--seqlen", type=positive, default=512, help="tokens per training sequence"),
    flag("--nsamples", type=positive, default=128,
         help="training windows cut from --calib-data (cycled through in seeded "
              "random order)"),
    flag("--calib-data", default=None,
         help="training text: a .txt/.jsonl file or wikitext2|c4|ptb (default: "
              "wikitext2 valid.txt, the calibration text)"),
    flag("--calib-sampling", choices=["consecutive", "random"],
         default="consecutive",
         help="consecutive: the first nsamples non-overlapping windows; random: "
              "seeded random windows"),
    flag("--seed", type=int, default=0, help="seed (adapter init, batch order)"),
    flag("--device", default="cpu", help="compute device: cpu or cuda[:N]"),
    flag("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
         help="compute dtype of training; auto = bf16 autocast (fp32 master weights) "
              "on a CUDA device with bf16 for an fp32 model, else the model's (on "
              "CPU, bf16 autocast training measured 5-20x slower than fp32)"),
    flag("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
         help="recompute activations in the backward to save memory; auto = on for "
              "accelerators (memory-bound), off on CPU (RAM is plenty; it would only "
              "add ~30%% compute)"),
    flag("--output", required=True,
         help="directory for the retrained checkpoint (plain, loads with "
              "AutoModelForCausalLM.from_pretrained; same masks file)"),
    OVERWRITE,
    flag("--export", choices=["dense", "compact"], default="dense",
         help="dense: a plain checkpoint; compact: see 'llmprune export'"),
    EXPORT_DTYPE,
    *eval_flags("perplexity before and after PERP"),
)


def _run_perp(args) -> int:
    """PERP: retrain norms/biases/masked LoRA of a pruned model

    PERP (Zimmer et al. 2023): retrain a tiny subset of a pruned model's parameters -- norm
    weights, biases and/or low-rank adapters whose merged update keeps the sparsity (MaskLoRA:
    W + (s B A) * M; ScaleLoRA: (B A) * W) -- on calibration text, merge, check that every
    pruned linear's zeros are exactly where they were, and write a plain checkpoint with the
    same masks file.
    """
    from ..retrain.perp import PerpConfig
    from ..runs.perp import perp_checkpoint, summary_line

    config = config_from_args(PerpConfig, args)
    meta = perp_checkpoint(args.model, config, args.output, overwrite=args.overwrite,
                           eval_ppl=args.eval_ppl, eval_seqlen=args.eval_seqlen,
                           eval_max_windows=args.max_windows, progress=not args.quiet,
                           export=args.export, export_dtype=args.export_dtype)
    print(f"{summary_line(meta)}; wrote {args.output}")
    return 0


# this family's commands, in the order of `llmprune --help`; each one's --help is its
# function's docstring
COMMANDS = (
    Command("perp", _run_perp, PERP_FLAGS),
)
