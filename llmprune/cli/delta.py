"""``dare`` and ``merge``: commands on the delta of fine-tuned models."""

from __future__ import annotations

from ..delta.dare import METHODS as DROP_METHODS, RESCALES
from .common import REPLACE, Command, calibration, flag, output_dir, sparsity_fraction


def _run_dare(args) -> int:
    """DARE: prune the delta of a fine-tuned model against its base

    DARE (Yu et al. 2024): drop a fraction --drop of the delta W_finetuned - W_base (random
    Bernoulli, or the smallest |delta| with --method magnitude), rescale the rest (by 1/(1-p)
    with --rescale dare) and write the merged model (--output) and/or the compact delta
    (--delta-output; load it with llmprune.load_pretrained(DIR, base=BASE)). Streams both
    checkpoints tensor by tensor.
    """
    from ..delta.dare import dare

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


def _run_merge(args) -> int:
    """merge several fine-tuned models onto their base (task arithmetic, TIES)

    Merge the task vectors tau_t = F_t - B of several fine-tuned checkpoints onto their base B:
    task arithmetic (B + sum_t w_t tau_t; Ilharco et al. 2023) or TIES (trim, elect sign,
    disjoint mean; Yadav et al. 2023), optionally after a DARE drop of every task vector
    (--drop). Streams all checkpoints tensor by tensor and writes a plain checkpoint.
    """
    from ..delta.merge import merge_models

    merge_models(args.base, args.finetuned, args.weights, args.method, args.density, args.lam,
                 args.drop, args.seed, args.output, args.overwrite, progress=not args.quiet)
    print(f"merged {len(args.finetuned)} model(s) onto {args.base} ({args.method}); "
          f"wrote {args.output}")
    return 0


DARE_FLAGS = (
    flag("--base", required=True, help="the base checkpoint directory"),
    flag("--finetuned", required=True, help="the fine-tuned checkpoint directory"),
    flag("--drop", type=sparsity_fraction, required=True,
         help="fraction of delta parameters dropped, in [0, 1)"),
    flag("--method", choices=DROP_METHODS, default=DROP_METHODS[0],
         help="which deltas are dropped"),
    flag("--rescale", choices=RESCALES, default=RESCALES[0],
         help="dare: kept deltas times 1/(1-drop); darex-q: times 1/q with q in "
              "[1-drop, 1] from --q, or searched on --calib-data (DAREx-q, Deng et "
              "al. 2024); none: as they are"),
    flag("--q", type=float, default=None,
         help="darex-q: use this q (no calibration); q = 1-drop is plain DARE"),
    flag("--q-mode", choices=["global", "per-layer"], default="global",
         help="darex-q without --q: global = one q for all tensors, the lowest "
              "calibration loss on a grid; per-layer = a closed-form least-squares q "
              "per decoder linear that keeps its calibration outputs closest to the "
              "fine-tuned model's, plus the global search for the other tensors"),
    *calibration(16, 256, "darex-q: ",
                 data="text of the fine-tuning domain (.txt/.jsonl path or a data set name; "
                      "default wikitext2)"),
    flag("--seed", type=int, default=0, help="seed of the random drop"),
    output_dir("directory for the merged model", required=False),
    flag("--delta-output", default=None, help="directory for the compact delta"),
    flag("--overwrite", action="store_true", help="replace outputs that exist"),
)


MERGE_FLAGS = (
    flag("--base", required=True, help="the base checkpoint directory"),
    flag("--finetuned", required=True, nargs="+",
         help="one or more fine-tuned checkpoint directories of that base"),
    flag("--weights", type=float, nargs="+", default=None,
         help="one weight per --finetuned (default: 1 each)"),
    flag("--method", choices=["task-arithmetic", "ties"], default="task-arithmetic",
         help="how the task vectors are combined"),
    flag("--density", type=float, default=0.2,
         help="ties: fraction of each task vector's largest entries kept by the trim"),
    flag("--lam", type=float, default=1.0,
         help="scale of the merged task vector (TIES' lambda)"),
    flag("--drop", type=sparsity_fraction, default=0.0,
         help="DARE drop rate applied to every task vector before merging (0 = off)"),
    flag("--seed", type=int, default=0, help="seed of the DARE drop"),
    output_dir("directory for the merged model"),
    REPLACE,
)


# this family's commands, in the order of `llmprune --help`; each one's --help is its
# function's docstring
COMMANDS = (
    Command("dare", _run_dare, DARE_FLAGS),
    Command("merge", _run_merge, MERGE_FLAGS),
)
