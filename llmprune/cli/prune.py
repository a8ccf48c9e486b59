"""The layerwise solvers' commands (one per registered solver), ``run`` (a YAML recipe) and
``sweep``."""

from __future__ import annotations

import argparse

from ..core.errors import UserError
from ..solvers import SOLVERS, options_of
from .common import (CALIB_DATA, CALIB_SAMPLING, EVAL_PPL_FLAGS, EXPORT_DTYPE, MODEL_FLAGS,
                     OVERWRITE, REPLACE, Command, add_flags, calibration, flag, option_flags,
                     output_dir, positive, sparsity_fraction)


SOLVER_FLAGS_1 = (
    flag("--sparsity", type=sparsity_fraction, default=None,
         help="fraction of weights to zero in every pruned linear, in [0, 1); implied "
              "by --pattern when that is N:M"),
    flag("--pattern", default=None,
         help="'unstructured' (default) or N:M, e.g. 2:4 or 4:8: keep at most N of "
              "every M consecutive weights along the input dimension"),
    output_dir("directory for the pruned checkpoint (dense, zeros in place, loads with "
               "AutoModelForCausalLM.from_pretrained) and its llmprune.json"),
    OVERWRITE,
    flag("--seed", type=int, default=0, help="random seed (calibration sampling, ties)"),
    flag("--allocation", choices=["uniform", "owl"], default="uniform",
         help="per-layer sparsity: the same everywhere, or OWL (Yin et al. 2024): "
              "layers with more activation outliers pruned less, same global average "
              "(reads calibration data, also for magnitude)"),
    flag("--owl-lambda", type=float, default=0.08,
         help="OWL: layer sparsities stay within the target +- lambda"),
    flag("--owl-m", type=float, default=5.0,
         help="OWL: a weight is an outlier when its Wanda score exceeds M x the "
              "layer's mean"),
    *calibration(128, 2048),
    CALIB_DATA,
    CALIB_SAMPLING,
    flag("--batch-size", type=positive, default=4,
         help="calibration sequences per forward pass (smaller: less memory; on "
              "smollm2 4 is as fast as 8 and peaks 100 MiB lower)"),
    flag("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
         help="within a layer, calibrate and prune q/k/v, then o, then gate/up, "
              "then down, each seeing the already pruned ones (default). It runs "
              "each layer once per batch, holding every batch's activations inside "
              "the layer at once where they fit a quarter of the free memory (else "
              "one pass per group). --no-true-sequential: all groups from one dense "
              "pass, then a second pass to propagate (on smollm2-135m: slower, "
              "and higher perplexity in 3 of 4 settings)"),
    flag("--moe-calibrate", choices=["routed", "all"], default="routed",
         help="mixture-of-experts: calibrate each expert on the tokens the router sends to "
              "it (routed), or on every calibration token (all: each token also runs "
              "through every expert for the statistics only; the layer's output still "
              "follows the router). With routed, an expert no token reaches is pruned by "
              "magnitude, and one that few tokens reach gets statistics from those few"),
    flag("--calib-dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
         help="dtype of the calibration forward passes (statistics and the solve "
              "stay float32); auto = the solver's preferred dtype on an fp32 model "
              "where that dtype is fast (sparsegpt: bf16, measured same perplexity, "
              "1.5x faster), else the model's"),
)


SOLVER_FLAGS_2 = (
    flag("--distributed", action="store_true",
         help="data-parallel calibration over the processes torchrun starts "
              "(torchrun --nproc-per-node N -m llmprune ... --distributed): each "
              "calibrates on its contiguous share of the batches, statistics are "
              "summed in rank order before each solve, rank 0 writes the output"),
    flag("--dist-backend", choices=["auto", "gloo", "nccl"], default="auto",
         help="torch.distributed backend for --distributed: auto = nccl with "
              "--device cuda (one GPU per process), gloo on CPU"),
    flag("--device-map", choices=["auto"], default=None,
         help="auto: spread each decoder layer over all visible GPUs (accelerate's "
              "planner), for layers that with their activations exceed one GPU; "
              "without CUDA it stays on the CPU"),
    flag("--export", choices=["dense", "compact"], default="dense",
         help="dense: a plain checkpoint with zeros in place (loads with "
              "from_pretrained); compact: only the kept weights plus bitmask / N:M "
              "indices (load with llmprune.load_pretrained), see 'llmprune export'"),
    EXPORT_DTYPE,
    *EVAL_PPL_FLAGS,
    flag("--stream", action="store_true",
         help="streaming engine for checkpoints larger than RAM: read one decoder "
              "layer at a time from the safetensors files, write it out pruned before "
              "the next loads; resumable (see --resume). Implied by --max-memory, "
              "--resume and --activations-offload disk"),
    flag("--max-memory", default=None, metavar="SIZE",
         help="memory budget of a streaming run, e.g. 4GiB: it refuses to start, with "
              "the numbers, if one layer + activations + solver statistics do not fit"),
    flag("--activations-offload", choices=["ram", "disk"], default="ram",
         help="streaming: keep the calibration hidden states in RAM, or in files in "
              "OUTPUT.partial/ (one batch in memory at a time)"),
    flag("--resume", action="store_true",
         help="streaming: continue an interrupted run from OUTPUT.partial/ after its "
              "last completed layer (bit-identical to an uninterrupted run)"),
)


def add_solver(sub, cls) -> None:
    p = sub.add_parser(cls.name, help=cls.help, description=cls.help,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, MODEL_FLAGS)
    add_flags(p, SOLVER_FLAGS_1)
    add_flags(p, option_flags(cls))
    add_flags(p, SOLVER_FLAGS_2)
    p.set_defaults(func=_run_solver, method=cls.name)


def _run_solver(args) -> int:
    from ..runs.prune import prune_checkpoint
    from ..recipe import PruneRecipe

    fields = dict(sparsity=args.sparsity, pattern=args.pattern,
                  seed=args.seed, device=args.device, allocation=args.allocation,
                  owl_lambda=args.owl_lambda, owl_m=args.owl_m,
                  nsamples=args.nsamples, seqlen=args.seqlen, calib_data=args.calib_data,
                  calib_sampling=args.calib_sampling, batch_size=args.batch_size,
                  true_sequential=args.true_sequential, calib_dtype=args.calib_dtype,
                  moe_calibrate=args.moe_calibrate)
    fields.update({f.name: getattr(args, f.name) for f in options_of(SOLVERS[args.method])})
    recipe = PruneRecipe.from_stage(args.method, fields)
    if args.stream or args.resume or args.max_memory or args.activations_offload == "disk":
        return _run_streaming(args, recipe)
    parallel = None
    if args.distributed:
        from dataclasses import replace

        from ..engine.distributed import init_from_env

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
    from ..runs.streaming import prune_streaming

    for name, given in (("--eval-ppl", args.eval_ppl),
                        ("--distributed", getattr(args, "distributed", False)),
                        ("--device-map", getattr(args, "device_map", None))):
        if given:
            raise UserError(f"{name} does not combine with the streaming engine (--stream, "
                            "--max-memory, --resume, --activations-offload disk); drop one")
    meta = prune_streaming(args.model, recipe, args.output, overwrite=args.overwrite,
                           resume=args.resume, max_memory=args.max_memory,
                           activations_offload=args.activations_offload, export=args.export,
                           export_dtype=args.export_dtype,
                           trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    print(f"pruned {len(meta['layers'])} linears to sparsity {meta['sparsity']:.4f} "
          f"in {meta['timings']['prune']:.1f} s (streaming); wrote {args.output}")
    return 0


def _run_recipe(args) -> int:
    """run a YAML recipe (solver -> export -> eval)

    Run a recipe: a model and stages, e.g. 'sparsegpt: {pattern: "2:4"}', 'export: {format:
    compact, dtype: bf16}', 'eval: {ppl: wikitext2}'. Every pruning output holds the
    recipe.yaml that reproduces it.
    """
    from ..runner import load, run

    meta = run(load(args.recipe, args.set), args.output, args.overwrite,
               progress=not args.quiet, trust_remote_code=args.trust_remote_code)
    print(f"pruned {len(meta['layers'])} linears to sparsity {meta['sparsity']:.4f}; wrote "
          f"{args.output or 'the recipe output'}")
    return 0


def _run_sweep(args) -> int:
    """perplexity over solvers x sparsities: table, JSON and PNG plot

    Prune a copy of the dense model for every solver x sparsity (x allocation) on the same
    calibration ids and evaluation windows, and write sweep.md, sweep.json, sweep.png
    (perplexity against sparsity) and, for OWL runs, owl_layers.png into --output. Holds two
    copies of the model in memory.
    """
    from ..sweep import sweep

    try:
        sparsities = [sparsity_fraction(v) for v in args.sparsity.split(",") if v.strip()]
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


RUN_FLAGS = (
    flag("recipe", help="path to the recipe YAML (see recipes/)"),
    flag("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
         help="override a value, e.g. --set sparsegpt.nsamples=64 or --set model=DIR "
              "(repeatable)"),
    output_dir("output directory (else the recipe's)", required=False),
    REPLACE,
    flag("--trust-remote-code", action="store_true",
         help="allow custom modelling code from the checkpoint (off by default; a recipe "
              "cannot set it)"),
)


SWEEP_FLAGS = (
    flag("--solvers", default=",".join(SOLVERS),
         help="comma-separated solvers"),
    flag("--sparsity", default="0.3,0.4,0.5,0.6,0.7",
         help="comma-separated sparsities in [0, 1)"),
    flag("--pattern", default=None, help="N:M instead of --sparsity (one point)"),
    flag("--allocation", default="uniform",
         help="comma-separated allocations: uniform, owl"),
    *calibration(128, 2048, data="calibration text (default wikitext2)", batch_size=4),
    flag("--eval-ppl", default="wikitext2", help="perplexity text"),
    flag("--eval-seqlen", type=positive, default=1024, help="perplexity window"),
    flag("--max-windows", type=positive, default=16, help="perplexity windows"),
    output_dir("directory for the table, JSON and plots"),
    REPLACE,
)


# this family's commands, in the order of `llmprune --help`; each one's --help is its
# function's docstring
COMMANDS = (
    Command("run", _run_recipe, RUN_FLAGS),
    Command("sweep", _run_sweep, (*MODEL_FLAGS, *SWEEP_FLAGS)),
)
