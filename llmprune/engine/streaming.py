"""The building blocks of streaming pruning (:mod:`llmprune.runs.streaming`): a model skeleton
on the meta device whose decoder layers are loaded one at a time from safetensors shards,
activations kept in RAM or on disk between layers, the working directory of a resumable run,
and the memory plan that decides whether a run fits before it starts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..core.errors import UserError
from ..core.finite import check_finite
from ..io.shards import parse_size
from ..io.loading import fuse
from ..io.output import write_text_atomic
from ..io.safetensors import SafetensorsFiles, write_safetensors
from ..models import adapter_for

log = logging.getLogger(__name__)

PROGRESS_VERSION = 1


def work_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.partial"


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = SafetensorsFiles([path])
    return {name: files.read(name) for name in files.entries}


# ----------------------------------------------------------------------------- activations
class DiskActivations:
    """The calibration batches' ``(hidden, kwargs)``, hidden states kept in files, not in RAM.

    Reading batch ``b`` loads it from the current directory; assigning batch ``b`` (what
    :func:`llmprune.calibrate.run_layer` does with a layer's output) writes it to the other
    directory, so one layer's inputs are never overwritten while it still reads them.
    :meth:`flip` makes the written outputs the next layer's inputs."""

    def __init__(self, root: Path, kwargs: list[dict], parity: int):
        self.root, self.kwargs, self.parity = root, kwargs, parity

    def dir(self, parity: int) -> Path:
        return self.root / f"acts-{parity}"

    def __len__(self) -> int:
        return len(self.kwargs)

    def __iter__(self):
        for b in range(len(self)):
            yield self[b]

    def __getitem__(self, b: int):
        return read_tensors(self.dir(self.parity) / f"b{b:05d}.safetensors")["h"], self.kwargs[b]

    def __setitem__(self, b: int, value) -> None:
        hidden, _ = value
        save_hidden(self.dir(1 - self.parity), b, hidden)

    def flip(self) -> None:
        self.parity = 1 - self.parity


def save_hidden(directory: Path, b: int, hidden: torch.Tensor) -> None:
    directory.mkdir(exist_ok=True)
    write_safetensors(directory / f"b{b:05d}.safetensors", ["h"], lambda _: hidden)


# ----------------------------------------------------------------------------- memory plan
@dataclass
class MemoryPlan:
    """Bytes a streaming run needs at its peak (the layer phase or the capture phase)."""

    base: int  # this process before any weight is read (interpreter, torch, transformers)
    layer: int  # the largest decoder layer in its stored dtype (+ a calib-dtype forward copy)
    activations: int  # hidden states of all calibration batches in RAM (2 batches if on disk)
    stats: int  # solver statistics alive while the costliest input group is solved
    work: int  # the solver's working memory for that group (float32 weight copies, scores,
    #            SparseGPT's factorisation of H)
    outside: int  # tensors outside the layers, resident (mapped pages) while capturing layer
    #               0's inputs; copied through a 16 MB buffer at the end
    peak_group: str = ""  # the input group whose solve is the peak

    @property
    def layer_phase(self) -> int:
        return self.layer + self.activations + self.stats + self.work

    @property
    def total(self) -> int:
        return self.base + max(self.layer_phase, self.outside + self.activations,
                               SafetensorsFiles.COPY_CHUNK)

    def as_dict(self) -> dict:
        return {"base": self.base, "layer": self.layer, "activations": self.activations,
                "stats": self.stats, "work": self.work, "outside": self.outside,
                "peak_group": self.peak_group, "layer_phase": self.layer_phase,
                "total": self.total}


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def current_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def group_cost(solver, lins: list[nn.Linear]) -> tuple[int, int]:
    """(statistics bytes, working bytes) of solving one input group of linears ``lins``."""
    in_f = lins[0].in_features
    return solver.stats_bytes(in_f), solver.work_bytes(
        in_f, sum(lin.weight.numel() for lin in lins) * 4, max(lin.weight.numel() for lin in lins))


def peak_solve(solver, layer: nn.Module, groups, true_sequential: bool) -> tuple[int, int, str]:
    """(statistics alive, working bytes, group names) at the costliest solve of ``layer``'s input
    ``groups``: all groups are collected in one pass and each is freed once solved
    (true-sequential: only the solved group's statistics are alive)."""
    costs = [group_cost(solver, [layer.get_submodule(n) for n in g]) for g in groups]
    best = (0, 0, "")
    for g, (_, work) in enumerate(costs):
        alive = costs[g][0] if true_sequential else sum(c[0] for c in costs[g:])
        if alive + work > best[0] + best[1]:
            best = (alive, work, ",".join(groups[g]))
    return best


def peak_solve_bound(solver, lins: dict[str, nn.Linear], true_sequential: bool
                     ) -> tuple[int, int, str]:
    """An upper bound of :func:`peak_solve` when a layer's input groups are not known yet (they
    are watched once weights run): statistics as if every linear were a group of its own, work
    as if all linears reading inputs of one width were one group (every real group, sharing one
    input, lies inside one such set)."""
    stats = [solver.stats_bytes(lin.in_features) for lin in lins.values()]
    by_width: dict[int, list[str]] = {}
    for name, lin in lins.items():
        by_width.setdefault(lin.in_features, []).append(name)
    work, names = max((group_cost(solver, [lins[n] for n in g])[1], g) for g in by_width.values())
    return (max(stats) if true_sequential else sum(stats)), work, ",".join(names)


def memory_plan(files: SafetensorsFiles, skel: nn.Module, adapter, recipe, solver,
                calib_dtype: torch.dtype | None, offload: str,
                fusions: dict | None = None) -> MemoryPlan:
    prefix = adapter.layers_path + "."
    per_layer: dict[int, int] = {}
    outside = 0
    tokens = recipe.nsamples * recipe.seqlen
    for name, (_, info, _) in files.entries.items():
        start, end = info["data_offsets"]
        if name.startswith(prefix):
            i = int(name[len(prefix):].split(".")[0])
            per_layer[i] = per_layer.get(i, 0) + end - start
        else:
            # mapped while capturing (load_outside): a matrix looked up by token (embeddings)
            # has at most the calibration tokens' rows resident, each with its partial pages
            nbytes, shape = end - start, info["shape"]
            if len(shape) >= 2 and shape[0]:
                nbytes = min(nbytes, tokens * (nbytes // shape[0] + 8192))
            outside += nbytes
    layer = max(per_layer.values(), default=0)
    # fusing a tensor (load_layer) holds its checkpoint tensors, their stack and the result at
    # once: twice its bytes beyond the layer's own
    layer += 2 * max((sum(files.entries[k][1]["data_offsets"][1]
                          - files.entries[k][1]["data_offsets"][0]
                          for keys in f.sources.values() for k in keys)
                      for f in (fusions or {}).values()), default=0)
    layers = adapter.layers(skel)
    first = layers[0]
    stored = next(first.parameters()).dtype
    if calib_dtype is not None and calib_dtype != stored:
        layer += layer // stored.itemsize * calib_dtype.itemsize
    if adapter.knows_groups(first):
        stats, work, peak_group = peak_solve(solver, first, adapter.groups_of(first),
                                             recipe.true_sequential)
    else:
        stats, work, peak_group = peak_solve_bound(solver, adapter.linears(first),
                                                   recipe.true_sequential)
    hidden = skel.config.hidden_size
    act_bytes = (calib_dtype or stored).itemsize
    batch = min(recipe.batch_size, recipe.nsamples) * recipe.seqlen * hidden * act_bytes
    if not solver.needs_calibration:
        activations = 0
    elif offload == "disk":
        activations = 2 * batch
    else:
        activations = recipe.nsamples * recipe.seqlen * hidden * act_bytes + batch
    return MemoryPlan(current_rss(), layer, activations, stats, work, outside, peak_group)


def prefer_mmap() -> None:
    """With a memory budget: serve every allocation above 4 MiB by its own mmap (glibc
    ``M_MMAP_THRESHOLD``), so that freed layer-sized buffers go back to the OS at once instead of
    staying in the brk heap. Measured on the 3B benchmark (Wanda): address space 2.9 -> 2.3 GiB,
    peak RSS 1.70 -> 1.53 GiB. Not the default because page faults on fresh maps cost time
    (30% on smollm2-135m, see calibrate._release_free_heap)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX: helper threads share arenas (64 MiB reserved each)
    except (OSError, AttributeError):
        pass


def parse_memory(text: str) -> int:
    try:
        return parse_size(text)
    except UserError:
        raise UserError(f"--max-memory must look like 4GiB, 3500MB or 8GB, got {text!r}") \
            from None


# ----------------------------------------------------------------------------- the model
def meta_skeleton(config, dtype: torch.dtype, trust_remote_code: bool):
    """Parameters on the meta device, buffers (rotary frequencies) real and on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise UserError(f"the checkpoint holds {name}, which its {model.config.model_type} model "
                        "does not have; is config.json the checkpoint's own?")


def to_meta(module: nn.Module) -> None:
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                     requires_grad=False)


def write_json(path: Path, data: dict) -> None:
    """A small JSON file of the work directory, written atomically and durably."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", durable=True)


def load_outside(model: nn.Module, files: SafetensorsFiles, names: list[str]) -> None:
    """The tensors outside the decoder layers, memory-mapped for the capture of layer 0's inputs:
    the embedding lookup touches only the calibration tokens' rows, and lm_head and the final
    norm are never touched (the forward stops at layer 0)."""
    for name in names:
        files.check_finite(name)
        set_tensor(model, name, files.map(name))
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"
            and not n.startswith(adapter_for(model).layers_path + ".")]
    if left:
        raise UserError(f"the checkpoint lacks {left[0]} (and {len(left) - 1} more tensors "
                        "outside the decoder layers); is it complete?")


def load_layer(model: nn.Module, layer: nn.Module, prefix: str, files: SafetensorsFiles,
                names: list[str], fusions: dict | None = None) -> None:
    """Read decoder layer ``prefix``'s checkpoint tensors ``names`` into ``layer``; those that
    transformers fuses on load (``fusions``: the model's name -> :class:`~llmprune.io.loading.
    Fusion`) are fused as it fuses them."""
    fusions = {t: f for t, f in (fusions or {}).items() if t.startswith(prefix)}
    fused = {k for f in fusions.values() for keys in f.sources.values() for k in keys}

    def read(name: str) -> torch.Tensor:
        tensor = files.read(name)
        check_finite(name, tensor, files.entries[name][0])
        return tensor
    for name in names:
        if name not in fused:
            set_tensor(model, name, read(name))
    for target, fusion in fusions.items():
        set_tensor(model, target, fuse(fusion, read))
    left = [n for n, p in layer.named_parameters() if p.device.type == "meta"]
    if left:
        raise UserError(f"the checkpoint lacks {prefix}{left[0]}; is it complete?")


