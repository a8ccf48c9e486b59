"""``eval``, ``bench-decode``, ``export``, ``inspect`` and ``push``: commands on a checkpoint that
exists."""

from __future__ import annotations

from ..core.errors import UserError
from .common import MODEL_FLAGS, REPLACE, Command, flag, output_dir, positive


def _run_eval(args) -> int:
    """perplexity and lm-eval tasks of a model

    Print the perplexity of a model as 'perplexity: <value>' and/or run lm-eval harness tasks
    on it (in memory: pruned, compact and shrunk models alike).
    """
    import json

    from ..core.device import check_device
    from ..io.data import load_text
    from ..evaluate.ppl import evaluate_loaded, record_eval
    from ..loaders import load_model

    check_device(args.device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    ppl_data = args.ppl or (None if tasks else "wikitext2")
    text = load_text(ppl_data, "eval") if ppl_data else None  # fail on a bad path first
    if args.json_path:
        from ..io.output import check_file_output

        check_file_output(args.json_path)
    if args.sparse == "cpu" and args.device != "cpu":
        raise UserError("--sparse cpu runs on the CPU; drop --device or use --sparse dense")
    sparse = args.sparse if args.device == "cpu" else "dense"
    model, tokenizer, resolved = load_model(args.model, trust_remote_code=args.trust_remote_code,
                                            sparse=sparse)
    results = {"model": args.model, **evaluate_loaded(
        model, tokenizer, ppl=ppl_data, seqlen=args.seqlen, max_windows=args.max_windows,
        batch_size=args.batch_size, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
        include_path=args.include_path, device=args.device, seed=args.seed,
        progress=not args.quiet, text=text)}
    if args.json_path:
        from ..io.output import write_text_atomic

        write_text_atomic(args.json_path, json.dumps(results, indent=2, default=str) + "\n")
    record_eval(resolved, results)
    return 0


def _run_bench_decode(args) -> int:
    """greedy decode tokens/s of a compact export: sparse CPU kernels vs dense

    Load a bf16 compact export twice (its pruned linears kept compressed for the CPU sparse
    kernels, and decoded to dense bf16; also dense fp32 unless --no-fp32), generate --tokens
    tokens greedily with each in turn, --rounds times, and print the median tokens/s of each and
    the speed-up over the faster dense one.
    """
    import json

    import torch

    from ..runs.decode import bench_compact

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = bench_compact(args.model, tokens=args.tokens, rounds=args.rounds,
                           fp32=not args.no_fp32)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"kernel path {result['kernel']}, {result['threads']} threads, {args.tokens} tokens, "
          f"median of {args.rounds} alternating rounds")
    for name, speed in result["tokens_per_s"].items():
        print(f"{name:>12}  {speed:8.2f} tokens/s")
    print(f"speed-up of sparse over {result['baseline']}: {result['speedup']['sparse']:.2f}x")
    return 0


def _run_export(args) -> int:
    """write a checkpoint as dense or compact safetensors

    Write checkpoint SRC to --output as 'dense' (a plain Hugging Face checkpoint, zeros in
    place) or 'compact' (pruned linears stored as their kept values plus a 1-bit mask per
    weight, or for N:M as values [out, in*N/M] plus packed 2-bit (2:4) indices; tensors too
    dense to gain stay plain). The masks come from the pruning run's metadata
    (llmprune_masks.safetensors); for a checkpoint without it pass --pattern. Load compact
    output with llmprune.load_pretrained(DIR) or any llmprune command's --model.
    """
    from ..io.checkpoints import export_checkpoint

    meta = export_checkpoint(args.src, args.output, args.format, args.dtype, args.pattern,
                             args.max_shard_size, args.overwrite, progress=not args.quiet)
    t = meta["totals"]
    print(f"wrote {args.output}: {len(meta['shards'])} shard(s), {t['file_bytes'] / 2**20:.1f} "
          f"MiB on disk; tensors {t['tensor_bytes'] / 2**20:.1f} MiB vs dense "
          f"{t['dense_tensor_bytes'] / 2**20:.1f} MiB ({meta['export_seconds']:.1f} s)")
    return 0


def _run_inspect(args) -> int:
    """per-tensor patterns, sparsity and bytes of a checkpoint

    Print a per-tensor table (shape, pattern, encoding, sparsity, bytes on disk) and
    whole-model totals against dense. Every tensor recorded as N:M is decoded and checked group
    by group; the exit code is 1 if one is not.
    """
    from ..io.inspection import format_table, inspect_checkpoint, to_json

    rows, totals = inspect_checkpoint(args.dir)
    print(to_json(rows, totals) if args.json else format_table(rows, totals))
    return 1 if totals["nm_violations"] else 0


def _run_push(args) -> int:
    """upload an output directory to the Hugging Face Hub with a model card

    Create the Hub repo (if needed) and upload every file of DIR plus a generated model card
    (README.md: base model, method, recipe, per-kind sparsity, size against dense, evaluations,
    how to load). DIR itself is never modified. The token comes from HF_TOKEN or `hf auth
    login`; HF_ENDPOINT selects another Hub.
    """
    from ..io.hub import push

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


EVAL_FLAGS = (
    flag("--ppl", default=None,
         help="perplexity text: wikitext2 (test.txt of the local copy), c4, ptb, or a "
              "local .txt/.jsonl file; default wikitext2 unless --tasks is given"),
    flag("--seqlen", type=positive, default=1024, help="tokens per perplexity window"),
    flag("--max-windows", type=positive, default=16,
         help="use at most this many non-overlapping windows from the start"),
    flag("--batch-size", type=positive, default=1,
         help="windows per forward pass, and lm-eval's batch size"),
    flag("--tasks", default=None,
         help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag (lm-eval "
              "0.4.13, run through simple_evaluate on the in-memory model)"),
    flag("--limit", type=float, default=None,
         help="lm-eval: at most this many documents per task (or a fraction < 1)"),
    flag("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples"),
    flag("--include-path", default=None,
         help="lm-eval: a directory of extra task YAMLs (e.g. tasks on local files, "
              "for offline use)"),
    flag("--seed", type=int, default=0, help="lm-eval random seeds"),
    flag("--json", dest="json_path", default=None, metavar="PATH",
         help="also write the results as JSON (lm-eval's per-task 'results' "
              "dictionary unchanged)"),
    flag("--sparse", choices=["auto", "cpu", "dense"], default="auto",
         help="a bf16 compact export on the CPU: auto/cpu keep its pruned linears compressed "
              "and run the CPU sparse kernels (cpu: an error where they cannot); dense "
              "decodes every weight"),
)


BENCH_DECODE_FLAGS = (
    flag("model", help="a bf16 compact export (llmprune export DIR --format compact --dtype bf16)"),
    flag("--tokens", type=positive, default=32, help="new tokens per greedy generate"),
    flag("--rounds", type=positive, default=3, help="alternating rounds; medians are printed"),
    flag("--threads", type=positive, default=None,
         help="torch threads (and the sparse kernels'); default torch's"),
    flag("--no-fp32", action="store_true", help="skip the dense fp32 baseline"),
    flag("--json", action="store_true", help="print JSON instead of a table"),
)


EXPORT_FLAGS = (
    flag("src", help="checkpoint directory (an llmprune output, or any Hugging Face "
                     "safetensors checkpoint together with --pattern)"),
    flag("--format", choices=["dense", "compact"], default="compact",
         help="output format"),
    flag("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
         help="dtype of the stored floating-point tensors; auto keeps the source's"),
    flag("--pattern", default=None,
         help="for a checkpoint without llmprune metadata only: 'unstructured' or N:M; "
              "the decoder linears' zeros become the masks, verified against it first"),
    flag("--max-shard-size", default="5GB",
         help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB"),
    output_dir("output directory (written atomically)"),
    REPLACE,
)


INSPECT_FLAGS = (
    flag("dir", help="a checkpoint directory (compact or dense)"),
    flag("--json", action="store_true", help="print JSON instead of a table"),
)


PUSH_FLAGS = (
    flag("dir", help="an llmprune output directory"),
    flag("--repo-id", required=True, help="user/name or org/name"),
    flag("--private", action="store_true", help="create the repo private"),
    flag("--dry-run", action="store_true",
         help="list what would be uploaded, with sizes, and make no HTTP call"),
    flag("--license", default=None,
         help="license for the card (default: the base model's, when known)"),
    flag("--commit-message", default=None, help="commit message on the Hub"),
)


# this family's commands, in the order of `llmprune --help`; each one's --help is its
# function's docstring
COMMANDS = (
    Command("eval", _run_eval, (*MODEL_FLAGS, *EVAL_FLAGS)),
    Command("bench-decode", _run_bench_decode, BENCH_DECODE_FLAGS),
    Command("export", _run_export, EXPORT_FLAGS),
    Command("inspect", _run_inspect, INSPECT_FLAGS),
    Command("push", _run_push, PUSH_FLAGS),
)
