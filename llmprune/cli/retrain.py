"""``perp``: retraining a pruned model."""

from __future__ import annotations

from ..retrain.perp import PerpConfig
from .common import (EXPORT_DTYPE, OVERWRITE, Command, config_from_args, eval_flags, flag,
                     option_flags, output_dir)


PERP_FLAGS = (
    flag("--model", required=True,
         help="a pruned checkpoint: the --output directory of 'llmprune "
              "magnitude|wanda|sparsegpt' (holds llmprune_masks.safetensors)"),
    *option_flags(PerpConfig),
    output_dir("directory for the retrained checkpoint (plain, loads with "
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
