"""Loading any checkpoint llmprune reads or writes: ``load_pretrained`` picks the format from the
directory through one registry (``FORMATS``), and ``load_model`` loads a model to prune.

Formats, tried in order (the first whose ``matches(src, base)`` holds loads the directory):

- ``delta``: a compact DARE delta against a base model (:func:`llmprune.dare.load_delta`);
- ``structured``: a structured export with per-layer widths
  (:func:`llmprune.structured.load_structured`);
- ``dense``: any plain transformers checkpoint, llmprune's dense outputs included;
- ``compact``: llmprune's compact export, decoded bit for bit; on the CPU a bf16 export's pruned
  linears stay compressed instead (:class:`llmprune.sparse.cpu.CPUSparseLinear`, ``sparse=``).

A new format is one loader function and one line in ``FORMATS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .core.finite import check_finite_model
from .core.errors import CorruptCheckpointError, ModelNotFoundError, UserError
from .delta.dare import load_delta
from .io.compact_reader import decode_parts, iter_compact_parts
from .io.loading import finish_load, load_config, model_key, no_init, resolve, skeleton
from .io.safetensors import check_checkpoint
from .io.meta import COMPACT_FORMAT, is_compact, read_meta
from .models import adapter_for, supported_model_types
from .sparse import cpu as cpu_sparse
from .sparse.apply import apply_kernels
from .sparse.linear import KERNELS
from .structured.format import is_structured_dir, load_structured
from .structured.shrink import CONFIG_KEY


@dataclass(frozen=True)
class Format:
    name: str
    matches: Callable[[Path, str | None], bool]  # (directory, base) -> this format?
    # (directory, dtype, verify, trust_remote_code, base) -> the model in eval mode
    load: Callable[[Path, torch.dtype | None, bool, bool, str | None], torch.nn.Module]
    takes_kernels: bool = False  # 2:4 linears can be swapped for SparseLinear afterwards
    takes_sparse: bool = False  # load(..., sparse=True) keeps pruned linears compressed


SPARSE = ("auto", "cpu", "dense")  # load_pretrained(sparse=...)


def _is_delta(src: Path, base: str | None) -> bool:
    meta = read_meta(src) or {}  # one read: llmprune.json of a big compact export is large
    return meta.get("format") == COMPACT_FORMAT and bool(meta.get("delta_of"))


def from_pretrained(src: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` of a resolved model, a local checkpoint's files
    checked first (:func:`llmprune.io.safetensors.check_checkpoint`); what safetensors still
    refuses is one CorruptCheckpointError."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if Path(src).is_dir():
        check_checkpoint(Path(src))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(src, output_loading_info=True,
                                                           **kwargs)
    except SafetensorError as exc:
        raise CorruptCheckpointError(f"cannot read the safetensors files of {src}: {exc}; the "
                                     "checkpoint is damaged, replace it") from None
    # transformers initialises what the files lack (or hold in another shape) at random and
    # only logs it: a damaged or foreign checkpoint would load as a different model
    lacking = [*info.get("missing_keys", ()), *(k[0] if isinstance(k, tuple) else k
                                                  for k in info.get("mismatched_keys", ()))]
    if lacking:
        raise CorruptCheckpointError(f"{src} lacks {len(lacking)} tensors of its model or holds "
                                     f"them in another shape (e.g. {sorted(lacking)[0]}); the "
                                     "checkpoint is damaged or its config.json is not its own")
    return model


def _load_dense(src: Path, dtype, verify: bool, trust_remote_code: bool, base):
    model = from_pretrained(str(src), dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    return model.eval()


def _sparse_weight(info: dict, parts: dict[str, torch.Tensor]) -> cpu_sparse.BitmaskWeight:
    """A compact ``bitmask`` or ``nm`` weight's parts in the CPU kernels' layout. The values are
    copied out of the shard: safetensors hands out views of its memory map, and one live view
    keeps the whole shard mapped, so every page read while loading (the decoded embeddings too)
    would stay resident."""
    from .io import compact

    shape = tuple(info["shape"])
    values = parts["values"].clone()
    if info["encoding"] == "bitmask":
        return cpu_sparse.bitmask_weight(parts["bitmask"].clone(), values, shape)
    keep = compact.nm_keep(parts["indices"], shape, info["n"], info["m"])
    return cpu_sparse.from_nm(values, keep)


def _swap_linear(model: torch.nn.Module, name: str, weight: cpu_sparse.BitmaskWeight) -> None:
    """Replace module ``name`` (an ``nn.Linear``) by a CPUSparseLinear with ``weight``."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    linear = getattr(owner, child)
    setattr(owner, child, cpu_sparse.CPUSparseLinear(weight, linear.bias))


def _compressible(model: torch.nn.Module, meta: dict, key) -> set[str]:
    """The ``nn.Linear`` modules whose weight the export stores compact (bitmask or N:M)."""
    modules = dict(model.named_modules())
    out = set()
    for name, info in meta["tensors"].items():
        name = key(name)
        owner = name.removesuffix(".weight")
        if (info["encoding"] in ("bitmask", "nm") and name.endswith(".weight")
                and isinstance(modules.get(owner), torch.nn.Linear)):
            out.add(owner)
    return out


def _load_compact(src: Path, dtype, verify: bool, trust_remote_code: bool, base,
                  sparse: bool = False):
    """Build the model from its config without initialising weights, then decode every tensor
    of the compact shards into it (shape and membership checked, checksums verified). With
    ``sparse`` the compact weights of ``nn.Linear`` modules are not decoded: those modules become
    CPUSparseLinear holding the stored parts (their dense weights are never allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = read_meta(src)
    stored = getattr(torch, meta["dtype"])
    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    with no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=stored,
                                                 trust_remote_code=trust_remote_code)
    key = model_key(model)
    compressible = _compressible(model, meta, key) if sparse else set()
    for owner in compressible:  # shape only: the dense weight is never read or written
        linear = model.get_submodule(owner)
        linear.weight = torch.nn.Parameter(linear.weight.to("meta"), requires_grad=False)
    params = model.state_dict()
    loaded: set[str] = set()
    compressed: dict[str, cpu_sparse.BitmaskWeight] = {}  # module name -> weight
    with torch.no_grad():
        for name, info, parts in iter_compact_parts(src, verify=verify):
            name = key(name)
            if name not in params:
                raise CorruptCheckpointError(f"{src}: tensor {name} does not belong to a "
                                             f"{config.model_type} model")
            if tuple(params[name].shape) != tuple(info["shape"]):
                raise CorruptCheckpointError(f"{src}: tensor {name} has shape "
                                             f"{tuple(info['shape'])}, the model wants "
                                             f"{tuple(params[name].shape)}")
            owner = name.removesuffix(".weight")
            if owner in compressible and name.endswith(".weight"):
                compressed[owner] = _sparse_weight(info, parts)
            else:
                params[name].copy_(decode_parts(name, info, parts)[0])
            loaded.add(name)
    model = finish_load(model, params, loaded, src, dtype)
    for owner, weight in compressed.items():
        _swap_linear(model, owner, weight)
    return model


FORMATS: list[Format] = [
    Format("delta", _is_delta,
           lambda src, dtype, verify, trc, base: load_delta(src, base, verify, trc)),
    Format("structured", lambda src, base: base is None and is_structured_dir(src),
           lambda src, dtype, verify, trc, base: load_structured(src, dtype, trc)),
    Format("dense", lambda src, base: not is_compact(src), _load_dense, takes_kernels=True),
    Format("compact", lambda src, base: True, _load_compact, takes_kernels=True,
           takes_sparse=True),
]


def with_kernels(model, src: Path, kernels: str | None, verify: bool):
    """Swap the 2:4 linears of a loaded model for SparseLinear (``kernels`` other than
    None/"dense"); a plain checkpoint without llmprune metadata has none."""
    if kernels is None or kernels == "dense":
        return model
    if kernels == "auto" and read_meta(src) is None:  # a plain checkpoint: nothing is 2:4
        return model
    return apply_kernels(model, src, kernels=kernels, verify=verify)


def cpu_sparse_wanted(src: Path, sparse: str, dtype: torch.dtype | None,
                      kernels: str | None) -> bool:
    """Whether a compact export at ``src`` loads with its pruned linears compressed for the CPU
    kernels: ``sparse="auto"`` for a bf16 export loaded in bf16 (the kernels' dtype) when no
    GPU ``kernels`` are asked for; ``"cpu"`` insists (a UserError where it cannot); ``"dense"``
    never."""
    if sparse not in SPARSE:
        raise UserError(f"sparse must be auto, cpu or dense, got {sparse!r}")
    if sparse == "dense":
        return False
    meta = read_meta(src) or {}
    why = None
    if meta.get("dtype") != "bfloat16":
        why = f"the export is stored in {meta.get('dtype')}, the CPU kernels read bf16 exports"
    elif dtype not in (None, torch.bfloat16):
        why = f"dtype={dtype} asks for dense weights; the CPU kernels compute in bf16"
    elif kernels not in (None, "dense"):
        why = f"kernels={kernels!r} asks for the GPU 2:4 kernels"
    if why is not None and sparse == "cpu":
        raise UserError(f"sparse='cpu': {why}; load with sparse='dense'")
    return why is None


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, verify: bool = True,
                    trust_remote_code: bool = False, kernels: str | None = None,
                    base: str | None = None, sparse: str = "auto"):
    """Load an llmprune checkpoint as a standard transformers model.

    For a compact export the weights are decoded bit for bit (each shard's size and header
    sha256 are checked first, and every tensor's checksum as it is read, unless ``verify=False``);
    a dense checkpoint is loaded with plain ``from_pretrained``.
    ``dtype`` optionally casts the loaded model. ``kernels`` ("auto" | "dense" | "triton" |
    "cusparselt") swaps every 2:4 linear for :class:`llmprune.sparse_linear.SparseLinear`, which
    picks a sparse backend only where a measured dispatch table says it beats dense (on CPU,
    "auto" stays dense); None or "dense" keeps plain ``nn.Linear``. ``base`` is the base model
    of a DARE delta.

    ``sparse`` ("auto" | "cpu" | "dense"): with "auto" (the default) the pruned linears of a bf16
    compact export stay compressed in memory as
    :class:`llmprune.sparse.cpu.CPUSparseLinear`, computed by the CPU sparse kernels (faster
    decode, less memory; CPU only, inference only); "dense" decodes every weight to a plain
    ``nn.Linear``; "cpu" insists on the kernels (an error where the export is not bf16).
    """
    if kernels is not None and kernels not in KERNELS:
        raise UserError(f"kernels must be auto, dense, triton or cusparselt, got {kernels!r}")
    src = Path(path).expanduser()
    if not (src / "config.json").exists():
        raise UserError(f"{path} is not a checkpoint directory (no config.json)")
    fmt = next(f for f in FORMATS if f.matches(src, base))
    if base is not None and fmt.name != "delta":
        raise UserError(f"{path} is not a delta checkpoint; load it without base=")
    if fmt.takes_sparse:
        want = cpu_sparse_wanted(src, sparse, dtype, kernels)
        model = fmt.load(src, dtype, verify, trust_remote_code, base, sparse=want)
    else:
        if sparse == "cpu":
            raise UserError(f"sparse='cpu' runs compact exports; {path} is a {fmt.name} "
                            "checkpoint")
        model = fmt.load(src, dtype, verify, trust_remote_code, base)
    check_finite_model(model, src)
    return with_kernels(model, src, kernels, verify) if fmt.takes_kernels else model


def load_model(model: str, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False,
               check=None, sparse: str = "dense"):
    """Resolve, check the architecture, and load ``(model, tokenizer, resolved_path)`` on the CPU.

    Weights stay on the CPU: the calibration engine moves one decoder layer at a time to the
    compute device. ``check(skeleton)`` runs on the weightless meta-device model before any
    weight is read, so shape errors surface in a second even for a 70B checkpoint. ``sparse``:
    how a compact export loads (:func:`load_pretrained`); "dense" (the default) for pruning.
    """
    from transformers import AutoTokenizer

    def _is_structured_dir(path: str) -> bool:
        return Path(path).is_dir() and CONFIG_KEY in config.to_dict()

    resolved = resolve(model)
    config = load_config(resolved, trust_remote_code)
    # before any weight is read: decoder layers discovery can find (a registered family has
    # them), and the caller's check on the weightless model
    if check is not None or config.model_type not in supported_model_types():
        skel = skeleton(config, trust_remote_code)
        adapter_for(skel)
        if check is not None:
            check(skel)
        del skel
    if is_compact(resolved) or _is_structured_dir(resolved):
        # a compact llmprune export (decoded bit-exact), or a structured one with per-layer
        # widths (built shrunk, then loaded)
        lm = load_pretrained(resolved, trust_remote_code=trust_remote_code, sparse=sparse)
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
        return lm, tokenizer, resolved
    try:
        lm = from_pretrained(resolved, dtype=dtype, trust_remote_code=trust_remote_code,
                             low_cpu_mem_usage=True)
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load model {model!r}: {exc}") from None
    check_finite_model(lm, resolved)
    lm.eval()
    return lm, tokenizer, resolved
