"""Peer runner: prune a Llama checkpoint with llm-compressor (SparseGPT or Wanda).

Run with the peer venv made by eval/peer_setup.sh (it must not import llmprune):

    eval/.peer-venv/bin/python eval/peer_llmcompressor.py --model DIR \
        --calib-ids calib.safetensors --method sparsegpt --sparsity 0.5 \
        --mask-structure 0:0 --output OUT_DIR --json result.json

The model is loaded in float32 on CPU and pruned by `llmcompressor.oneshot` with
`SparseGPTModifier` / `WandaPruningModifier` (targets=["Linear"],
ignore=["re:.*lm_head"]); all other llm-compressor defaults are kept and
reported in the JSON. Calibration uses exactly the token ids in the
`input_ids` tensor [nsamples, seqlen] of --calib-ids: a `datasets.Dataset`
with `input_ids` and an all-ones `attention_mask`, wrapped in a DataLoader that
keeps llm-compressor's own batch size (1) and collator but samples in file
order (llm-compressor's non-shuffling LengthAwareSampler argsorts equal
lengths, which is not stable and permutes the samples). A hook on the token
embedding checks that the ids the model saw are exactly those of the file.

The pruned model is saved with plain transformers `save_pretrained` as a dense
float32 checkpoint (zeros in place, no compressed-tensors config).
"""

import argparse
import json
import time
from importlib.metadata import version

import torch
from datasets import Dataset
from safetensors.torch import load_file
from torch.utils.data import DataLoader, SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

import llmcompressor
from compressed_tensors.offload import remove_dispatch
from llmcompressor.args import DatasetArguments
from llmcompressor.datasets.utils import DataCollatorWithTruncation
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from llmcompressor.utils.pytorch.module import infer_sequential_targets


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries ru_maxrss across
    fork+exec, so a run started by a large benchmark driver would report the driver's peak."""
    import re

    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024.0


def layer_sparsity(model) -> tuple[int, int]:
    """(zeros, total) over all nn.Linear weights but the LM head (the decoder layers' linears)."""
    zeros = total = 0
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib-ids", required=True)
    p.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--mask-structure", default="0:0", help="0:0 (unstructured) or N:M")
    p.add_argument("--output", required=True)
    p.add_argument("--json", required=True)
    args = p.parse_args()

    ids = load_file(args.calib_ids)["input_ids"]
    assert ids.dtype == torch.int64 and ids.dim() == 2, (ids.dtype, ids.shape)
    nsamples, seqlen = ids.shape

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.to("cpu").eval()
    load_seconds = time.perf_counter() - t0
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception:  # no tokenizer in the dir: oneshot only needs a placeholder
        tokenizer = None

    dense_zeros, _ = layer_sparsity(model)

    dataset = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    # Same DataLoader llm-compressor builds (batch_size=1, truncation collator with
    # max_seq_length), but with a sequential sampler so the file order is kept.
    dataloader = DataLoader(
        dataset,
        batch_size=1,
        sampler=SequentialSampler(dataset),
        collate_fn=DataCollatorWithTruncation(seqlen),
    )

    modifier_cls = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    modifier = modifier_cls(
        sparsity=args.sparsity,
        mask_structure=args.mask_structure,
        targets=["Linear"],
        ignore=["re:.*lm_head"],
    )

    # Record what the embedding actually receives (real cpu tensors only; tracing
    # feeds fx proxies / meta tensors).
    seen = []

    def record_ids(_module, inputs):
        x = inputs[0]
        if type(x) is torch.Tensor and x.device.type == "cpu":
            seen.append(x.detach().clone())

    hook = model.get_input_embeddings().register_forward_pre_hook(record_ids)

    t0 = time.perf_counter()
    llmcompressor.oneshot(
        model=model,
        processor=tokenizer if tokenizer is not None else object(),  # unused: data is pre-tokenized
        recipe=modifier,
        dataset=dataloader,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        output_dir=None,  # we save ourselves, as a plain dense checkpoint
    )
    prune_seconds = time.perf_counter() - t0
    peak_after_prune = peak_rss_mib()
    hook.remove()

    # ids seen by the model: the first nsamples real batches (the propagation pass
    # of the first layer runs them again), in order, must equal the file exactly.
    seen_ids = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen[:nsamples]])
    calib_exact = seen_ids.shape == ids.shape and torch.equal(seen_ids, ids)

    zeros, total = layer_sparsity(model)

    t0 = time.perf_counter()
    remove_dispatch(model)  # drop compressed-tensors' cpu->cpu offload wrappers
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    # the class method bypasses llm-compressor's compressed save_pretrained wrapper
    PreTrainedModel.save_pretrained(model, args.output)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output)
    save_seconds = time.perf_counter() - t0

    ds_defaults = DatasetArguments()
    defaults = {
        "pipeline": f"{ds_defaults.pipeline} (-> sequential for pruning modifiers)",
        "sequential_targets": sorted(infer_sequential_targets(model, None)),
        "propagate_error": ds_defaults.propagate_error,
        "batch_size": ds_defaults.batch_size,
        "data_collator": ds_defaults.data_collator,
        "sequential_offload_device": ds_defaults.sequential_offload_device,
        "forward_dtype": str(model.dtype),
        "attention": "eager (forced during calibration)",
    }
    if args.method == "sparsegpt":
        defaults.update(
            dampening_frac=modifier.dampening_frac,
            block_size=modifier.block_size,
            hessian_dtype="float32",
            offload_hessians=modifier.offload_hessians,
            preserve_sparsity_mask=modifier.preserve_sparsity_mask,
        )
    else:
        defaults.update(row_scalar_dtype="float32")

    result = {
        "method": args.method,
        "mask_structure": args.mask_structure,
        "sparsity": args.sparsity,
        "prune_seconds": round(prune_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "save_seconds": round(save_seconds, 3),
        "peak_rss_mib_after_prune": round(peak_after_prune, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "llmcompressor_version": version("llmcompressor"),
        "torch_version": torch.__version__,
        "transformers_version": version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "measured_sparsity": zeros / total,
        "measured_zeros": zeros,
        "measured_total": total,
        "dense_zeros_before": dense_zeros,
        "calib_ids_exact": calib_exact,
        "llmcompressor_defaults": defaults,
        "notes": (
            f"measured sparsity {zeros / total:.4f} = exact zeros over all nn.Linear "
            f"weights but the LM head ({zeros}/{total}, {dense_zeros} zeros before); "
            f"calibration ids seen by the model equal the file in order: {calib_exact}; "
            "calibration via DataLoader(batch_size=1, SequentialSampler, "
            "DataCollatorWithTruncation(seqlen)) over a datasets.Dataset; "
            "saved dense float32 with plain transformers save_pretrained"
        ),
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
