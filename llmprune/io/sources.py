"""What an export reads: :class:`Source` (tensors one at a time, with the pruning masks and
metadata that go with them) and the sources of a checkpoint directory (dense or compact), of a
model in memory, and of the keep masks taken from a checkpoint's zeros."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.sparsity import Sparsity
from . import compact
from .compact_reader import iter_compact
from .meta import COMPACT_FORMAT, MASKS_FILE, META_FILE, nm_of, read_masks, read_meta
from .safetensors import WEIGHT_FILE_RE, SafetensorsFiles, checkpoint_files, iter_safetensors

log = logging.getLogger(__name__)


@dataclass
class Source:
    """Tensors to export, one at a time, with the pruning masks and metadata that go with them."""

    tensors: Iterator[tuple[str, torch.Tensor]]
    config: dict
    # weight name -> keep mask: bool [out, in], or packed 1 bit per weight (uint8, see
    # compact.pack_bits) so that a 70B model's masks fit in memory
    masks: dict[str, torch.Tensor] | None
    meta: dict | None  # the pruning run's llmprune.json (recipe, layers, ...)
    copy_files: list[Path] = field(default_factory=list)  # tokenizer etc.
    nm: tuple[int, int] | None = None
    count: int | None = None  # how many tensors ``tensors`` yields (at most), when known
    # fused expert parameters (3-D) whose mask covers their expert slices stacked, [E * out, in]
    # (compact.stack_experts): name -> whether the parameter stores each expert as [in, out]
    stacked: dict[str, bool] = field(default_factory=dict)
    # masks of single experts of a fused parameter, ``<owner>.expert_linears.<param>.<e>.weight``
    # (as the pruning run names them; no tensor of the checkpoint has the name) -> the (out, in)
    # each covers; a dense export's masks file keeps them as they are
    expert_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)


def side_files(src: Path) -> list[Path]:
    """The files of checkpoint directory ``src`` that an output copies as they are: everything
    but the weights (any format), ``config.json`` and llmprune's own metadata (tokenizer,
    generation config, chat template, README, ...)."""
    return [p for p in sorted(src.iterdir()) if p.is_file() and not WEIGHT_FILE_RE.search(p.name)
            and p.name not in (META_FILE, MASKS_FILE, "config.json")]


def dir_source(src: Path) -> Source:
    """A checkpoint directory: dense (with or without llmprune metadata) or compact."""
    meta = read_meta(src)
    config = json.loads((src / "config.json").read_text())
    copy_files = side_files(src)
    if meta and meta.get("format") == COMPACT_FORMAT:
        masks: dict[str, torch.Tensor] = {}

        def tensors():
            for name, dense, keep in iter_compact(src):
                if keep is not None:
                    masks[name] = keep
                yield name, dense
        # masks fill in as tensors are read; the exporter looks a tensor's mask up after reading
        stacked = {name: info["transposed"] for name, info in meta["tensors"].items()
                   if "transposed" in info}
        return Source(tensors(), config, masks, meta.get("source_meta"), copy_files,
                      nm_of(meta.get("source_meta")), len(meta.get("tensors") or {}) or None,
                      stacked)
    masks = read_masks(src)
    if meta is not None and masks is None:
        log.warning("%s has llmprune.json but no %s (made by an older llmprune?); pass --pattern "
                    "to derive the masks from the zeros", src, MASKS_FILE)
    stacked, expert_shapes = {}, {}
    files = SafetensorsFiles(checkpoint_files(src))
    if masks:
        masks, stacked, expert_shapes = with_fused_masks(src, masks)
        stacked = {n: t for n, t in stacked.items() if n in files.entries}
    return Source(iter(files), config, masks, meta, copy_files, nm_of(meta), len(files.entries),
                  stacked, expert_shapes)


def check_model_keys(src: Path) -> None:
    """That every tensor of dense checkpoint ``src`` is one its model holds as it is (or under
    another name): a compact export stores the checkpoint's tensors, and the compact loader
    cannot undo what transformers converts on load (e.g. Mixtral's experts saved one by one,
    fused into 3-D parameters when loaded). UserError otherwise."""
    from .loading import load_config, model_key, skeleton

    key = model_key(skeleton(load_config(str(src))),
                    remedy="a compact export holds the model's own tensors: prune with "
                           "--export compact, which writes the fused experts, or export "
                           "--format dense")
    for name in SafetensorsFiles(checkpoint_files(src)).entries:
        key(name)


def with_fused_masks(src: Path, masks: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, tuple]]:
    """A dense checkpoint's masks (weight name -> packed keep bits) plus, for each fused expert
    parameter whose experts the masks name one by one (``<owner>.expert_linears.<param>.<e>``,
    as the pruning run names them), that parameter's stacked mask; and the stacked parameters
    (:attr:`Source.stacked`); and the single experts' masks' shapes (:attr:`Source.expert_shapes`).
    Which way the parameter stores its experts is read from the model's weightless skeleton,
    built only when the masks name experts."""
    from ..models.experts import expert_of, fused_masks
    from .loading import load_config, skeleton

    modules = {n.removesuffix(".weight"): bits for n, bits in masks.items()}
    if not any(expert_of(n) for n in modules):
        return masks, {}, {}
    model = skeleton(load_config(str(src)))
    fused = fused_masks(model, modules)
    return {**masks, **{n: f.bits for n, f in fused.items()}}, \
        {n: f.transposed for n, f in fused.items()}, expert_mask_shapes(model, modules)


def expert_mask_shapes(model, masks: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Weight name -> (out, in) of each single expert that ``masks`` (by module name) name and
    ``model`` has (:attr:`Source.expert_shapes`)."""
    from ..models.experts import expert_weight

    weights = {n: expert_weight(model, n) for n in masks}
    return {f"{n}.weight": tuple(w.shape) for n, w in weights.items() if w is not None}


def model_source(model, masks: dict[str, torch.Tensor] | None, meta: dict | None,
                 tokenizer_dir: Path | None = None) -> Source:
    """An in-memory model (``--export compact`` straight after pruning). ``masks`` are packed
    keep bits by module name, as :class:`llmprune.calibrate.Report` holds them; the masks of
    the experts of a fused expert parameter become that parameter's (stacked) mask."""
    from ..models.experts import fused_masks

    keep, stacked, expert_shapes = None, {}, {}
    if masks is not None:
        fused = fused_masks(model, masks)
        keep = {f"{name}.weight": bits for name, bits in masks.items()}
        keep.update({name: f.bits for name, f in fused.items()})
        stacked = {name: f.transposed for name, f in fused.items()}
        expert_shapes = expert_mask_shapes(model, masks)

    state = model.state_dict()

    def tensors():
        seen: set[int] = set()
        for name, t in state.items():
            if t.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) are saved once
                continue
            seen.add(t.data_ptr())
            yield name, t.detach()
    copy_files = []
    if tokenizer_dir is not None:
        copy_files = [p for p in sorted(tokenizer_dir.iterdir()) if p.is_file()]
    return Source(tensors(), model.config.to_dict(), keep, meta, copy_files, nm_of(meta),
                  len(state), stacked, expert_shapes)


def pattern_masks(src: Path, config: dict, pattern: str) -> tuple[dict, tuple[int, int] | None]:
    """For a checkpoint without llmprune masks: keep masks from the nonzeros of every decoder
    linear, verified against ``pattern`` (``unstructured`` or ``N:M``) before anything is written."""
    from transformers import AutoConfig

    from .loading import skeleton
    from ..models import adapter_for

    target = Sparsity.parse(None if ":" in pattern else 0.0, pattern)
    nm = (target.n, target.m) if target.kind == "nm" else None
    skel = skeleton(AutoConfig.from_pretrained(src))
    adapter = adapter_for(skel)
    names = {f"{adapter.layers_path}.{i}.{lin}.weight"
             for i, layer in enumerate(adapter.layers(skel)) for lin in adapter.linears(layer)}
    masks = {}
    for name, weight in iter_safetensors(checkpoint_files(src)):
        if name not in names:
            continue
        keep = weight != 0
        del weight
        if nm and not compact.nm_fits(keep, *nm):
            groups = keep.view(keep.shape[0], -1, nm[1]).sum(-1) if keep.shape[1] % nm[1] == 0 \
                else None
            where = "" if groups is None else " (row {}, group {} keeps {})".format(
                *[int(v) for v in (groups > nm[0]).nonzero()[0]],
                int(groups[tuple((groups > nm[0]).nonzero()[0])]))
            raise UserError(f"{name} is not {pattern}{where}; the checkpoint does not have that "
                            "pattern: pass the pattern it was pruned with, or 'unstructured'")
        masks[name] = compact.pack_bits(keep)
    if len(masks) != len(names):
        raise UserError(f"{src} lacks {len(names) - len(masks)} decoder linear weights; is it a "
                        "complete checkpoint?")
    return masks, nm
