"""Structured pruning machinery: attention heads and MLP channels, masked, zeroed or cut out.

A *structured mask* holds one dict per decoder layer, ``True`` = keep::

    [{"heads": BoolTensor[n_heads], "mlp": BoolTensor[n_channels]}, ...]

Groups (the architecture data lives in :mod:`llmprune.models.structured`: a registered
``Adapter.structured`` or a layout found from the model, :func:`llmprune.models.structured_layout`;
a fused projection holds several blocks of rows, e.g. ``[q; k; v]``, or repeats them per KV head,
``[kv_heads, q_per_kv + 2, head_dim]`` as Falcon's ``query_key_value``):

* a **query head** ``h`` is rows ``h*head_dim:(h+1)*head_dim`` of q (and its bias) and the same
  columns of the output projection (o_proj / out_proj). With grouped-query attention (GQA) query
  head ``h`` reads KV head ``h // (n_heads / n_kv_heads)`` (``repeat_kv`` order); a KV head whose
  query heads are all removed is dead and its k/v rows go too. OPT and GPT-NeoX (multi-head
  attention) have one KV head per query head, so removing a head removes its q, k, v rows and
  output-projection columns.
* an **MLP channel** ``c`` is row ``c`` of every MLP input linear (gate and up, or fc1 + its bias)
  and column ``c`` of the output linear (down, fc2).

Three ways to apply a mask, exactly equivalent on the logits:

* :func:`masked` -- forward pre-hooks zero the removed head slices of the output projection's input
  and the removed channels of the MLP output linear's input; weights untouched (cheap sub-model
  evaluations, e.g. Bonsai's);
* :func:`zero_` -- the same written into the weights;
* :func:`shrink_` -- weights and biases physically sliced, the config updated: a smaller dense
  model. Heads keep their ``head_dim``; Llama-family configs get ``head_dim`` set explicitly.

What to remove is chosen in :mod:`llmprune.structured.selection`; the file format of the result
is :mod:`llmprune.structured.format`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.errors import UnsupportedArchitectureError
from ..io.meta import STRUCTURED_FORMAT
from ..models import Adapter, StructuredLayout, adapter_for, structured_layout

log = logging.getLogger(__name__)

StructuredMask = list[dict[str, torch.Tensor]]

CONFIG_KEY = "llmprune_structured"  # per-layer widths of a non-uniform export, in config.json


@dataclass(frozen=True)
class LayerGroups:
    """One decoder layer's prunable groups and what each costs in parameters."""

    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (== n_heads for OPT / MHA)
    head_dim: int
    n_channels: int  # MLP intermediate channels
    head_params: int  # removed with one query head: q rows (+ bias) + o columns
    kv_params: int  # one KV head: k + v rows (+ biases); removed when its query heads all go
    channel_params: int  # removed with one MLP channel: MLP-in rows (+ biases) + MLP-out column
    other_params: int = 0  # linear parameters in no group (output biases of o / down / fc2)
    fixed_heads: str | None = None  # why no head of this layer can be removed (None: they can)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def total_params(self) -> int:
        return (self.n_heads * self.head_params + self.n_kv_heads * self.kv_params
                + self.n_channels * self.channel_params + self.other_params)


# ----------------------------------------------------------------------------- layout
def layout_of(model) -> tuple[Adapter, StructuredLayout]:
    """The model's adapter and structured layout (a one-line UnsupportedArchitectureError where
    structured pruning does not apply)."""
    return adapter_for(model), structured_layout(model)


def _numel(lin: nn.Linear) -> int:
    return lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)


def _bias_per_row(lin: nn.Linear) -> int:
    return 1 if lin.bias is not None else 0


def _kv_heads(layer: nn.Module, lay: StructuredLayout, n_heads: int, head_dim: int) -> int:
    """The layer's KV heads: from the rows of its k block, else (heads fixed) from the attention
    module's KV-head or KV-group attribute, else one per query head."""
    for name, kinds in lay.rows:
        if "k" in kinds:
            fixed = sum(n_heads * head_dim for k in kinds if k == "q")
            per_kv = head_dim * sum(1 for k in kinds if k in ("k", "v"))
            return (layer.get_submodule(name).out_features - fixed) // per_kv
    attn = layer.get_submodule(lay.attention)
    n = getattr(attn, lay.kv_heads_attr, None) if lay.kv_heads_attr else None
    if lay.kv_groups_attr and not isinstance(n, int):
        n = n_heads // max(1, getattr(attn, lay.kv_groups_attr))
    return n if isinstance(n, int) and n > 0 and n_heads % n == 0 else n_heads


def _group_params(layer: nn.Module, lay: StructuredLayout, index, kind: str) -> int:
    """Parameters one row of ``kind`` costs in every linear holding such rows (+ biases)."""
    total = 0
    for name, _ in index[kind]:
        lin = layer.get_submodule(name)
        total += lin.in_features + _bias_per_row(lin)
    return total


def row_index(lay: StructuredLayout, g: LayerGroups) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """kind -> [(linear, its rows holding the kind, in the kind's order)] of one layer with the
    widths of ``g`` (:meth:`StructuredLayout.row_index`)."""
    return lay.row_index(g.n_heads, g.n_kv_heads, g.head_dim, g.n_channels)


def layer_groups(model) -> list[LayerGroups]:
    """The groups of every decoder layer, read from the modules' actual shapes (so a model that
    is already shrunk, uniformly or not, is described correctly)."""
    adapter, lay = layout_of(model)
    out = []
    for layer in adapter.layers(model):
        attn = layer.get_submodule(lay.attention)
        head_dim = int(attn.head_dim if hasattr(attn, "head_dim") else attn.head_size)
        o = layer.get_submodule(lay.o)
        down = layer.get_submodule(lay.mlp_out)
        n_heads = o.in_features // head_dim
        n_kv = _kv_heads(layer, lay, n_heads, head_dim)
        index = lay.row_index(n_heads, n_kv, head_dim, down.in_features)
        if lay.fixed_heads:
            head_params = kv_params = 0  # the attention's linears are in no group
        else:
            head_params = head_dim * _group_params(layer, lay, index, "q") + o.out_features * head_dim
            kv_params = head_dim * (_group_params(layer, lay, index, "k")
                                    + _group_params(layer, lay, index, "v"))
        channel_params = _group_params(layer, lay, index, "mlp") + down.out_features
        total = sum(_numel(layer.get_submodule(n)) for n in lay.linears)
        other = total - (n_heads * head_params + n_kv * kv_params
                         + down.in_features * channel_params)
        assert other >= 0 and o.out_features == down.out_features, (other, o.out_features)
        out.append(LayerGroups(n_heads, n_kv, head_dim, down.in_features, head_params,
                               kv_params, channel_params, other, lay.fixed_heads))
    return out


def full_mask(model) -> StructuredMask:
    """Keep everything."""
    return [{"heads": torch.ones(g.n_heads, dtype=torch.bool),
             "mlp": torch.ones(g.n_channels, dtype=torch.bool)} for g in layer_groups(model)]


def check_mask(groups: list[LayerGroups], mask: StructuredMask) -> None:
    if len(mask) != len(groups):
        raise ValueError(f"mask has {len(mask)} layers, the model {len(groups)}")
    for i, (g, m) in enumerate(zip(groups, mask)):
        if tuple(m["heads"].shape) != (g.n_heads,) or tuple(m["mlp"].shape) != (g.n_channels,):
            raise ValueError(f"layer {i}: mask shapes {tuple(m['heads'].shape)} / "
                             f"{tuple(m['mlp'].shape)} do not fit {g.n_heads} heads / "
                             f"{g.n_channels} channels")
        if g.fixed_heads and not bool(m["heads"].bool().all()):
            raise UnsupportedArchitectureError(f"layer {i}: no attention head can be removed: "
                                               f"{g.fixed_heads}; prune MLP channels only (--mlp)")


def kv_alive(g: LayerGroups, heads: torch.Tensor) -> torch.Tensor:
    """Bool [n_kv]: KV heads that still serve at least one kept query head."""
    return heads.bool().reshape(g.n_kv_heads, g.group_size).any(dim=1)


def removed_params(groups: list[LayerGroups], mask: StructuredMask) -> int:
    check_mask(groups, mask)
    n = 0
    for g, m in zip(groups, mask):
        heads = m["heads"].bool().cpu()
        n += int((~heads).sum()) * g.head_params
        n += int((~kv_alive(g, heads)).sum()) * g.kv_params
        n += int((~m["mlp"].bool().cpu()).sum()) * g.channel_params
    return n


def removed_fraction(model_or_groups, mask: StructuredMask) -> float:
    """Fraction of decoder-layer linear parameters (weights + biases) the mask removes."""
    groups = (model_or_groups if isinstance(model_or_groups, list)
              else layer_groups(model_or_groups))
    return removed_params(groups, mask) / sum(g.total_params for g in groups)


# ----------------------------------------------------------------------------- masked / zero_
@contextlib.contextmanager
def masked(model, mask: StructuredMask) -> Iterator[None]:
    """Run ``model`` as if the removed heads and channels were gone; weights untouched.

    A head's whole contribution to the layer output goes through its ``head_dim`` slice of the
    output projection's input, and a channel's through its input column of the MLP output linear,
    so zeroing those inputs (a forward pre-hook) is exactly removing the group; a dead KV head
    then feeds nothing. Hooks are removed on exit, also on an exception."""
    adapter, lay = layout_of(model)
    groups = layer_groups(model)
    check_mask(groups, mask)
    handles = []

    def scale_input(keep: torch.Tensor):
        def hook(module, args):
            x = args[0]
            return (x * keep.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
        return hook

    try:
        for layer, g, m in zip(adapter.layers(model), groups, mask):
            heads = m["heads"].bool()
            if not bool(heads.all()):
                keep = heads.repeat_interleave(g.head_dim)  # [n_heads * head_dim]
                handles.append(layer.get_submodule(lay.o).register_forward_pre_hook(
                    scale_input(keep)))
            channels = m["mlp"].bool()
            if not bool(channels.all()):
                handles.append(layer.get_submodule(lay.mlp_out).register_forward_pre_hook(
                    scale_input(channels.clone())))
        yield
    finally:
        for h in handles:
            h.remove()


def forward_with_hooks(model, ids: torch.Tensor, batch_size: int,
                       hooks: list[tuple[nn.Module, Callable]], desc: str,
                       progress: bool = True) -> None:
    """Run ``ids`` ``[n, seqlen]`` through ``model`` in batches (no KV cache) with the forward
    pre-hooks ``(module, hook)`` registered, and remove them again, whatever happens."""
    from tqdm.auto import tqdm

    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        device = next(model.parameters()).device
        for batch in tqdm(ids.split(batch_size), desc=desc, unit="batch", disable=not progress):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return heads.bool().repeat_interleave(head_dim)


@torch.no_grad()
def zero_(model, mask: StructuredMask) -> None:
    """Write the mask into the weights: the removed heads' q rows (+ bias) and output-projection
    columns, dead KV heads' k/v rows (+ biases), removed channels' MLP-in rows (+ biases) and
    MLP-out columns become zero. Same logits as :func:`masked` and :func:`shrink_`."""
    adapter, lay = layout_of(model)
    groups = layer_groups(model)
    check_mask(groups, mask)
    for layer, g, m in zip(adapter.layers(model), groups, mask):
        heads = m["heads"].bool().cpu()
        drop = {"q": ~_head_rows(heads, g.head_dim),
                "k": ~_head_rows(kv_alive(g, heads), g.head_dim),
                "mlp": ~m["mlp"].bool().cpu()}
        drop["v"] = drop["k"]
        for kind, entries in row_index(lay, g).items():
            for name, rows in entries:
                _zero_rows(layer.get_submodule(name), rows[drop[kind]])
        o = layer.get_submodule(lay.o)
        o.weight[:, drop["q"].to(o.weight.device)] = 0
        out = layer.get_submodule(lay.mlp_out)
        out.weight[:, drop["mlp"].to(out.weight.device)] = 0


def _zero_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    """Zero the rows ``rows`` (LongTensor) of ``lin`` and of its bias."""
    rows = rows.to(lin.weight.device)
    lin.weight[rows] = 0
    if lin.bias is not None:
        lin.bias[rows] = 0


# ----------------------------------------------------------------------------- shrink_
def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> None:
    """Keep the given output rows / input columns of ``lin`` (index tensors), in place."""
    w = lin.weight.data
    if rows is not None:
        w = w[rows.to(w.device)]
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data[rows.to(w.device)].clone(),
                                    requires_grad=lin.bias.requires_grad)
        lin.out_features = int(rows.numel())
    if cols is not None:
        w = w[:, cols.to(w.device)]
        lin.in_features = int(cols.numel())
    lin.weight = nn.Parameter(w.contiguous().clone(), requires_grad=lin.weight.requires_grad)


def _layer_widths(g: LayerGroups, m: dict[str, torch.Tensor], layer_idx: int) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, n_channels) after the mask, checking the GQA constraint."""
    heads = m["heads"].bool().cpu()
    per_group = heads.reshape(g.n_kv_heads, g.group_size).sum(dim=1)
    alive = per_group[per_group > 0]
    if alive.numel() == 0:
        raise ValueError(f"layer {layer_idx}: the mask removes every attention head; keep at "
                         "least one")
    if bool((alive != alive[0]).any()):
        raise ValueError(f"layer {layer_idx}: kept query heads per KV head are "
                         f"{per_group.tolist()}; a shrunk GQA layer needs the same number in every "
                         "surviving KV group (select(..., gqa='even' or 'kv') gives such masks)")
    n_channels = int(m["mlp"].bool().sum())
    if n_channels == 0:
        raise ValueError(f"layer {layer_idx}: the mask removes every MLP channel; keep at least one")
    return int(heads.sum()), int(alive.numel()), n_channels


@torch.no_grad()
def shrink_(model, mask: StructuredMask) -> None:
    """Cut the removed heads and channels out of the weights and update the config.

    Every layer's linears are sliced in place (biases with them), the attention modules'
    per-layer head counts updated. When all layers end up with the same widths (and, where the
    config derives head_dim from the head count, the head count is unchanged) the config's head
    counts / MLP width are set to them, so the model saves as a plain Hugging Face checkpoint;
    otherwise the config keeps its widths and records the per-layer ones under
    ``config.llmprune_structured`` (load with :func:`llmprune.load_pretrained`)."""
    adapter, lay = layout_of(model)
    groups = layer_groups(model)
    check_mask(groups, mask)
    widths = [_layer_widths(g, m, i) for i, (g, m) in enumerate(zip(groups, mask))]
    if lay.uniform_heads and len({w[:2] for w in widths}) > 1:
        raise UnsupportedArchitectureError(
            f"the mask keeps different head counts per layer, but {lay.uniform_heads}: remove "
            "the same heads in every layer (uniform selection)")
    for layer, g, m, (nh, nkv, _) in zip(adapter.layers(model), groups, mask, widths):
        heads = m["heads"].bool().cpu()
        keep = {"q": _head_rows(heads, g.head_dim),
                "k": _head_rows(kv_alive(g, heads), g.head_dim),
                "mlp": m["mlp"].bool().cpu()}
        keep["v"] = keep["k"]
        for name, idx in _kept_rows(lay, g, keep).items():
            _slice_linear(layer.get_submodule(name), rows=idx)
        _slice_linear(layer.get_submodule(lay.o), cols=torch.nonzero(keep["q"]).squeeze(1))
        c_idx = torch.nonzero(keep["mlp"]).squeeze(1)
        _slice_linear(layer.get_submodule(lay.mlp_out), cols=c_idx)
        _set_runtime_widths(layer, lay, nh, nkv, int(c_idx.numel()))
    _update_config(model, lay, groups, widths)


def _kept_rows(lay: StructuredLayout, g: LayerGroups, keep: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Per row linear, the indices of its kept rows (``keep[kind]``: bool over the kind's
    rows), ascending: the kept rows stay in their order, so a shrunk fused linear has the same
    row layout with fewer heads, KV heads or channels (the mask keeps as many query heads in
    every surviving KV group)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for kind, entries in row_index(lay, g).items():
        for name, rows in entries:
            parts.setdefault(name, []).append(rows[keep[kind]])
    return {name: torch.cat(p).sort().values for name, p in parts.items()}


def _set_runtime_widths(layer: nn.Module, lay: StructuredLayout, n_heads: int, n_kv: int,
                        n_channels: int) -> None:
    attn = layer.get_submodule(lay.attention)
    if not lay.fixed_heads:  # else the attention is as it was
        for attr, value in ((lay.heads_attr, n_heads), (lay.kv_groups_attr, n_heads // n_kv),
                            (lay.kv_heads_attr, n_kv)):
            if attr:
                setattr(attn, attr, value)
    if lay.mlp and hasattr(layer.get_submodule(lay.mlp), "intermediate_size"):
        layer.get_submodule(lay.mlp).intermediate_size = n_channels


def _update_config(model, lay: StructuredLayout, groups: list[LayerGroups],
                   widths: list[tuple[int, int, int]]) -> None:
    config = model.config
    head_dim = groups[0].head_dim
    uniform = len(set(widths)) == 1
    nh, nkv, nc = widths[0]
    heads_changed = any(w[0] != getattr(config, lay.heads_key) for w in widths)
    if uniform and (lay.head_dim_in_config or not heads_changed):
        keys = [lay.heads_key, lay.mlp_key] + ([lay.kv_key] if lay.kv_key else []) + (
            ["head_dim"] if lay.head_dim_in_config else [])
        if lay.fixed_heads:  # the attention is as it was: its config keys stay
            keys = [lay.mlp_key]
        old = {k: getattr(config, k, None) for k in keys}
        new = {lay.heads_key: nh, lay.mlp_key: nc, lay.kv_key: nkv, "head_dim": head_dim}
        for k in keys:
            setattr(config, k, new[k])  # head_dim explicit: no longer hidden_size // heads
        if _config_valid(config) and _config_builds(model):
            if hasattr(config, CONFIG_KEY):
                delattr(config, CONFIG_KEY)
            return
        # e.g. transformers' LlamaConfig insists on hidden_size % num_attention_heads == 0 even
        # with an explicit head_dim, or a family derives head_dim from hidden_size / heads: keep
        # the old widths and record the new ones instead
        for k in keys:
            setattr(config, k, old[k])
    # Non-uniform: the config keeps widths from which the skeleton is built (those it had, or
    # the per-layer maxima if a layer grew past them, which shrinking never does) and records
    # each layer's widths.
    setattr(config, CONFIG_KEY, {
        "format": STRUCTURED_FORMAT, "head_dim": head_dim,
        "layers": [{"n_heads": a, "n_kv_heads": b, "intermediate_size": c} for a, b, c in widths],
        "note": "per-layer widths of a structured-pruned model; load it with "
                "llmprune.load_pretrained (plain from_pretrained cannot build it)"})


def _config_builds(model) -> bool:
    """Whether ``model``'s class builds, from its config alone, parameters of exactly the shapes
    it has (what a plain ``from_pretrained`` needs); checked on a weightless meta-device copy."""
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()} == have


def _config_valid(config) -> bool:
    validate = getattr(config, "validate", None)  # transformers 5 strict configs
    if validate is None:
        return True
    try:
        validate()
    except Exception:  # noqa: BLE001 - any validator failure means "not a plain config"
        return False
    return True


def shrink_to_widths(model, widths: list[dict]) -> None:
    """Shrink a freshly built skeleton so that every layer has the recorded widths (keeps the first
    KV heads, the first query heads of each, and the first channels; the weights are loaded after)."""
    groups = layer_groups(model)
    if len(widths) != len(groups):
        raise ValueError(f"{len(widths)} recorded layer widths for a {len(groups)}-layer model")
    mask = []
    for g, w in zip(groups, widths):
        nh, nkv, nc = int(w["n_heads"]), int(w["n_kv_heads"]), int(w["intermediate_size"])
        if nkv > g.n_kv_heads or nh % nkv or nh // nkv > g.group_size or nc > g.n_channels:
            raise ValueError(f"recorded widths {w} do not fit the config's {g.n_heads} heads / "
                             f"{g.n_kv_heads} KV heads / {g.n_channels} channels")
        heads = torch.zeros(g.n_kv_heads, g.group_size, dtype=torch.bool)
        heads[:nkv, :nh // nkv] = True
        mlp = torch.zeros(g.n_channels, dtype=torch.bool)
        mlp[:nc] = True
        mask.append({"heads": heads.reshape(-1), "mlp": mlp})
    config = model.config
    saved = getattr(config, CONFIG_KEY, None)
    shrink_(model, mask)
    if saved is not None:  # keep the recorded entry (notes and all), not the re-derived one
        setattr(config, CONFIG_KEY, saved)


