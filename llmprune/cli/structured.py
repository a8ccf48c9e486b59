"""``structured``, ``bonsai`` and ``loraprune``: structured pruning commands."""

from __future__ import annotations

from ..structured.bonsai import BonsaiConfig
from ..structured.loraprune import LoRAPruneConfig
from ..structured.selection import IMPORTANCES
from .common import (CALIB_DATA, CALIB_SAMPLING, EVAL_PPL_FLAGS, MODEL_FLAGS, OVERWRITE, Command,
                     calibration, config_from_args, flag, fraction, option_flags, output_dir,
                     sparsity_fraction)


IMPORTANCE = flag("--importance", choices=IMPORTANCES, default=IMPORTANCES[0],
                  help="group importance: weight norms (no data) or activation norms")


STRUCTURED_TARGET_FLAGS = (
    flag("--sparsity", type=sparsity_fraction, default=None,
         help="fraction of decoder-layer linear parameters to remove, in [0, 1). "
              "Alone: about the same fraction of attention and of MLP parameters "
              "(heads come in coarse steps; the MLP channels make up the total)"),
    flag("--heads", type=fraction("--heads"), default=None,
         help="fraction of query heads to remove (overrides the split of --sparsity; "
              "rounded to whole steps: with GQA one head per KV group, or whole KV "
              "groups with --gqa kv)"),
    flag("--mlp", type=fraction("--mlp"), default=None,
         help="fraction of MLP intermediate channels to remove (overrides the split "
              "of --sparsity)"),
    flag("--non-uniform", action="store_true",
         help="rank heads and channels across all layers, so layers keep different "
              "widths (loads with llmprune.load_pretrained, not plain "
              "from_pretrained); default: the same widths in every layer, a plain "
              "Hugging Face checkpoint"),
    flag("--gqa", choices=["even", "kv"], default="even",
         help="grouped-query attention: even = remove the same number of query heads "
              "from every KV group; kv = remove whole KV groups (k/v shrink too)"),
)


SHRUNK_OUTPUT = output_dir("directory for the shrunk checkpoint and its llmprune.json")


STRUCTURED_FLAGS = (
    SHRUNK_OUTPUT,
    OVERWRITE,
    *calibration(32, 512, "activation: ", batch_size=4,
                 data="calibration text, a .txt/.jsonl file or wikitext2|c4|ptb (default: "
                      "wikitext2 valid.txt)"),
    *EVAL_PPL_FLAGS,
)



# bonsai and loraprune: calibration, output and evaluation
CALIB_AND_OUTPUT_FLAGS = (
    CALIB_DATA,
    CALIB_SAMPLING,
    flag("--seed", type=int, default=0,
         help="random seed (sub-model sampling / LoRA init and data order, random "
              "windows)"),
    SHRUNK_OUTPUT,
    OVERWRITE,
    *EVAL_PPL_FLAGS,
)

def _run_structured(args) -> int:
    """one-shot head / MLP-channel pruning (smaller model)

    One-shot structured pruning baseline: score every attention head and MLP channel
    (magnitude: L2 norm of the group's weights; activation: L2 norm of its activations on
    calibration text), remove the least important ones and write a physically smaller model.
    Uniform widths load with plain AutoModelForCausalLM.from_pretrained.
    """
    from ..core.device import check_device
    from ..runs.structured import structured_checkpoint

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


def _structured_cli_target(args):
    from ..structured.bonsai import Target

    return Target(sparsity=args.sparsity, heads=args.heads, mlp=args.mlp)


def _run_options(args) -> dict:
    """The calibration, output and evaluation options of a bonsai / loraprune run."""
    return dict(nsamples=args.nsamples, seqlen=args.seqlen, calib_data=args.calib_data,
                calib_sampling=args.calib_sampling, overwrite=args.overwrite,
                eval_ppl=args.eval_ppl, eval_seqlen=args.eval_seqlen,
                eval_max_windows=args.max_windows, trust_remote_code=args.trust_remote_code,
                device=args.device, progress=not args.quiet)


def _run_iterative(args, config_cls, checkpoint, detail) -> int:
    """bonsai / loraprune: the config from the flags, the run, one summary line (``detail`` of
    the run's report in the middle)."""
    config = config_from_args(config_cls, args, target=_structured_cli_target(args),
                              uniform=not args.non_uniform)
    info = checkpoint(args.model, args.output, config, **_run_options(args))
    print(f"removed {info['removed_fraction']:.4f} of the decoder-layer linear parameters "
          f"{detail(info['report'])}; wrote {args.output} (loads with {info['loads_with']})")
    return 0


def _run_bonsai(args) -> int:
    """Bonsai: forward-only structured pruning (smaller model)

    Bonsai (Dery et al. 2024, 'Everybody Prune Now'): structured pruning with forward passes
    only. In every iteration, sub-models that drop random subsets of the candidate heads /
    MLP-channel blocks are scored by their calibration loss, a ridge regression of that loss on
    which groups were kept estimates each group's importance, and the least important are
    removed; repeated until the target. Needs only inference memory. Writes a physically
    smaller model.
    """
    from ..runs.structured import bonsai_checkpoint

    return _run_iterative(args, BonsaiConfig, bonsai_checkpoint, lambda report: (
        f"with {report['sub_model_evaluations']} sub-model evaluations (forward passes only)"))


def _run_loraprune(args) -> int:
    """LoRAPrune: prune while LoRA fine-tuning (smaller model)

    LoRAPrune (Zhang et al. 2023): LoRA adapters (peft) on a frozen base are fine-tuned on the
    calibration text while heads and MLP channels are removed on a schedule, ranked by the
    LoRA-guided criterion ((W + BA) * (G_B A + B G_A))^2 with a moving average; only LoRA
    weights get gradients. The LoRA is merged at the end and the model shrunk.
    """
    from ..runs.structured import loraprune_checkpoint

    return _run_iterative(args, LoRAPruneConfig, loraprune_checkpoint, lambda report: (
        f"({report['trainable_params']:,} trainable LoRA parameters, peak RSS "
        f"{report['peak_rss_mib']:.0f} MiB)"))


def _run_experts(args) -> int:
    """remove whole MoE experts (fewer experts per layer)

    Whole-expert pruning of a mixture-of-experts model: every expert is scored on the
    calibration tokens the router sends to it -- reap (Lasby et al. 2025): the mean over those
    tokens of the router's gate value times the norm of the expert's output; frequency: how many
    tokens it receives -- and the least salient are removed, the same number in every layer.
    The fused expert weights and the router rows are sliced and the config's expert count set,
    so plain AutoModelForCausalLM.from_pretrained loads the result.
    """
    from ..runs.experts import experts_checkpoint

    meta = experts_checkpoint(
        args.model, args.output, keep_ratio=args.keep_ratio, saliency=args.saliency,
        nsamples=args.nsamples, seqlen=args.seqlen, calib_data=args.calib_data,
        calib_sampling=args.calib_sampling, batch_size=args.batch_size, seed=args.seed,
        overwrite=args.overwrite, eval_ppl=args.eval_ppl, eval_seqlen=args.eval_seqlen,
        eval_max_windows=args.max_windows, trust_remote_code=args.trust_remote_code,
        device=args.device, progress=not args.quiet)
    e = meta["experts"]
    print(f"kept {e['experts_after']} of {e['experts_before']} experts in each of {e['blocks']} "
          f"MoE layers ({args.saliency}); wrote {args.output} (loads with {meta['loads_with']})")
    return 0


EXPERTS_FLAGS = (
    flag("--keep-ratio", type=float, required=True,
         help="fraction of the experts each MoE layer keeps, in (0, 1] (rounded to a whole "
              "count, the same in every layer)"),
    flag("--saliency", choices=["reap", "frequency"], default="reap",
         help="reap: router gate x expert output norm on the tokens routed to the expert; "
              "frequency: number of tokens routed to it"),
    *calibration(32, 512, batch_size=4),
    CALIB_DATA,
    CALIB_SAMPLING,
    flag("--seed", type=int, default=0, help="random seed (random calibration windows)"),
    output_dir("directory for the checkpoint with fewer experts and its llmprune.json"),
    OVERWRITE,
    *EVAL_PPL_FLAGS,
)


# this family's commands, in the order of `llmprune --help`; each one's --help is its
# function's docstring
COMMANDS = (
    Command("structured", _run_structured,
            (*MODEL_FLAGS, IMPORTANCE, *STRUCTURED_TARGET_FLAGS, *STRUCTURED_FLAGS)),
    Command("bonsai", _run_bonsai,
            (*MODEL_FLAGS, *STRUCTURED_TARGET_FLAGS, *calibration(32, 512),
             *CALIB_AND_OUTPUT_FLAGS, *option_flags(BonsaiConfig))),
    Command("loraprune", _run_loraprune,
            (*MODEL_FLAGS, *STRUCTURED_TARGET_FLAGS, *calibration(64, 512),
             *CALIB_AND_OUTPUT_FLAGS, *option_flags(LoRAPruneConfig))),
    Command("experts", _run_experts, (*MODEL_FLAGS, *EXPERTS_FLAGS)),
)
