"""The file format of a structured export (:func:`save_structured`, :func:`load_structured`).

The same widths in every layer (and no head removed where the config derives head_dim from the
head count: OPT, GPT-NeoX, Falcon) give a plain Hugging Face checkpoint; otherwise the per-layer
widths go into ``config.json`` as ``llmprune_structured``, the weights into
``llmprune-structured*.safetensors``, and the model loads with :func:`llmprune.load_pretrained`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..core.errors import UserError
from ..io.meta import STRUCTURED_FORMAT, write_meta
from .selection import describe
from .shrink import CONFIG_KEY, StructuredMask, layer_groups, shrink_, shrink_to_widths

log = logging.getLogger(__name__)


WEIGHTS_NAME = "llmprune-structured.safetensors"


WEIGHTS_INDEX = "llmprune-structured.safetensors.index.json"


# A plain from_pretrained on a non-uniform export reads model.safetensors.index.json, whose entries
# all point at this (non-existent) file, and fails with its name in the error.
SIGNPOST = "LLMPRUNE-STRUCTURED-CHECKPOINT-WITH-PER-LAYER-WIDTHS--load-it-with-llmprune.load_pretrained"


# ----------------------------------------------------------------------------- save
def is_structured(config: dict) -> bool:
    return CONFIG_KEY in config


def save_structured(model, tokenizer, out_dir, mask: StructuredMask, meta: dict, *,
                    overwrite: bool = False) -> dict:
    """Shrink ``model`` in place with ``mask`` and write it to ``out_dir`` (atomically).

    Uniform widths that the config can hold (no OPT, GPT-NeoX or Falcon head removed): a plain
    Hugging Face checkpoint (``AutoModelForCausalLM.from_pretrained`` loads it). Otherwise
    ``config.json`` records the per-layer widths under ``llmprune_structured``, the weights are
    in ``llmprune-structured*.safetensors`` and ``model.safetensors.index.json`` points at a file
    named after ``llmprune.load_pretrained`` that does not exist, so a plain ``from_pretrained``
    fails with that name in its message.
    ``llmprune.json`` gets ``meta`` plus the format, the mask summary and the removed fraction.
    Returns the written llmprune.json content."""
    from ..io.output import atomic_dir, check_output

    out = check_output(out_dir, overwrite)
    groups = layer_groups(model)
    summary = describe(groups, mask)
    shrink_(model, mask)
    plain = not hasattr(model.config, CONFIG_KEY)
    info = {**meta, "format": STRUCTURED_FORMAT, "loads_with": (
        "AutoModelForCausalLM.from_pretrained" if plain else "llmprune.load_pretrained"),
        "removed_fraction": summary["removed_fraction"], "structured": summary}
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not plain:
            _hide_weights(tmp)
        write_meta(tmp, info)
    return info


def _hide_weights(tmp: Path) -> None:
    """Rename the weights of a non-uniform export away from the names from_pretrained looks for,
    and leave a signpost index in their place."""
    index = tmp / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        index.rename(tmp / WEIGHTS_INDEX)
        names = list(data["weight_map"])
    else:
        from safetensors import safe_open

        single = tmp / "model.safetensors"
        with safe_open(str(single), framework="pt") as f:
            names = list(f.keys())
        single.rename(tmp / WEIGHTS_NAME)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"format": STRUCTURED_FORMAT},
         "weight_map": {name: SIGNPOST for name in names}}, indent=2) + "\n")


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of a non-uniform export."""
    index = src / WEIGHTS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [src / f for f in dict.fromkeys(weight_map.values())]
    single = src / WEIGHTS_NAME
    if single.exists():
        return [single]
    raise UserError(f"{src} records per-layer widths ({CONFIG_KEY} in config.json) but has no "
                    f"{WEIGHTS_NAME}; the export is incomplete")


# ----------------------------------------------------------------------------- loading
def is_structured_dir(src: Path) -> bool:
    from ..core.errors import CorruptCheckpointError

    try:
        return CONFIG_KEY in json.loads((src / "config.json").read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise CorruptCheckpointError(f"cannot read {src / 'config.json'}: {exc}") from None


def load_structured(src: Path, dtype: torch.dtype | None, trust_remote_code: bool):
    """A structured export with per-layer widths (``llmprune_structured`` in config.json): build
    the model from its config, shrink every layer to its recorded widths, then load the weights
    (every tensor must be there with exactly the shape the shrunk model wants; a key that
    transformers renames on load, as GPT-NeoX's ``embed_out``, is read under the model's name)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.errors import CorruptCheckpointError
    from ..io.safetensors import SafetensorsFiles
    from ..io.loading import finish_load, model_key, no_init

    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    widths = getattr(config, CONFIG_KEY)["layers"]
    files = SafetensorsFiles(weight_files(src))
    with no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=files.float_dtype(),
                                                 trust_remote_code=trust_remote_code)
    try:
        shrink_to_widths(model, widths)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{src}: {exc}") from None
    params = model.state_dict()
    key = model_key(model, "a structured export holds none; it was not written by llmprune")
    loaded: set[str] = set()
    with torch.no_grad():
        for stored, tensor in files:
            name = key(stored)
            if name not in params or tuple(params[name].shape) != tuple(tensor.shape):
                want = tuple(params[name].shape) if name in params else "no such tensor"
                raise CorruptCheckpointError(f"{src}: tensor {stored} {tuple(tensor.shape)} does "
                                             f"not fit the recorded widths ({want})")
            params[name].copy_(tensor)
            loaded.add(name)
    return finish_load(model, params, loaded, src, dtype)
