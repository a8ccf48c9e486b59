"""Structured pruning machinery: attention heads and MLP channels, masked, zeroed or cut out.

A *structured mask* holds one dict per decoder layer, ``True`` = keep::

    [{"heads": BoolTensor[n_heads], "mlp": BoolTensor[n_channels]}, ...]

Groups (the architecture data lives in :mod:`llmprune.models`, ``Adapter.structured``):

* a **query head** ``h`` is rows ``h*head_dim:(h+1)*head_dim`` of q (and its bias) and the same
  columns of the output projection (o_proj / out_proj). With grouped-query attention (GQA) query
  head ``h`` reads KV head ``h // (n_heads / n_kv_heads)`` (``repeat_kv`` order); a KV head whose
  query heads are all removed is dead and its k/v rows go too. OPT (multi-head attention) has one
  KV head per query head, so removing a head removes its q, k, v rows and out_proj columns.
* an **MLP channel** ``c`` is row ``c`` of every MLP input linear (gate and up, or fc1 + its bias)
  and column ``c`` of the output linear (down, fc2).

Three ways to apply a mask, exactly equivalent on the logits:

* :func:`masked` -- forward pre-hooks zero the removed head slices of the output projection's input
  and the removed channels of the MLP output linear's input; weights untouched (cheap sub-model
  evaluations, e.g. Bonsai's);
* :func:`zero_` -- the same written into the weights;
* :func:`shrink_` -- weights and biases physically sliced, the config updated: a smaller dense
  model. Heads keep their ``head_dim``; Llama-family configs get ``head_dim`` set explicitly.

Targets (:func:`select`): ``sparsity`` is the fraction of *decoder-layer linear parameters*
(weights + biases of every nn.Linear inside the decoder layers; embeddings, norms and lm_head not
counted) removed; ``heads`` / ``mlp`` are fractions of the query heads / MLP channels removed.

Export (:func:`save_structured`): the same widths in every layer (and, for OPT, no head removed)
give a plain Hugging Face checkpoint; otherwise the per-layer widths go into ``config.json`` as
``llmprune_structured`` and the model loads with :func:`llmprune.load_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .core.errors import UnsupportedArchitectureError, UserError
from .models import Adapter, StructuredLayout, adapter_for

log = logging.getLogger(__name__)

StructuredMask = list[dict[str, torch.Tensor]]

CONFIG_KEY = "llmprune_structured"  # per-layer widths of a non-uniform export, in config.json
STRUCTURED_FORMAT = "llmprune-structured"
WEIGHTS_NAME = "llmprune-structured.safetensors"
WEIGHTS_INDEX = "llmprune-structured.safetensors.index.json"
# A plain from_pretrained on a non-uniform export reads model.safetensors.index.json, whose entries
# all point at this (non-existent) file, and fails with its name in the error.
SIGNPOST = "LLMPRUNE-STRUCTURED-CHECKPOINT-WITH-PER-LAYER-WIDTHS--load-it-with-llmprune.load_pretrained"


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

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def total_params(self) -> int:
        return (self.n_heads * self.head_params + self.n_kv_heads * self.kv_params
                + self.n_channels * self.channel_params + self.other_params)


# ----------------------------------------------------------------------------- layout
def _layout(model) -> tuple[Adapter, StructuredLayout]:
    adapter = adapter_for(model)
    if adapter.structured is None:
        raise UnsupportedArchitectureError(
            f"structured pruning (heads / MLP channels) does not support model type "
            f"{model.config.model_type!r} yet; supported: llama, mistral, qwen2, opt")
    return adapter, adapter.structured


def _numel(lin: nn.Linear) -> int:
    return lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)


def _bias_per_row(lin: nn.Linear) -> int:
    return 1 if lin.bias is not None else 0


def layer_groups(model) -> list[LayerGroups]:
    """The groups of every decoder layer, read from the modules' actual shapes (so a model that
    is already shrunk, uniformly or not, is described correctly)."""
    adapter, lay = _layout(model)
    out = []
    for layer in adapter.layers(model):
        attn = layer.get_submodule(lay.attention)
        head_dim = int(attn.head_dim)
        q, k, v, o = (layer.get_submodule(n) for n in (lay.q, lay.k, lay.v, lay.o))
        ins = [layer.get_submodule(n) for n in lay.mlp_in]
        down = layer.get_submodule(lay.mlp_out)
        n_heads = o.in_features // head_dim
        n_kv = k.out_features // head_dim
        hidden = q.in_features
        head_params = head_dim * (q.in_features + _bias_per_row(q)) + o.out_features * head_dim
        kv_params = head_dim * (k.in_features + _bias_per_row(k) + v.in_features
                                + _bias_per_row(v))
        channel_params = sum(m.in_features + _bias_per_row(m) for m in ins) + down.out_features
        total = sum(_numel(m) for m in (q, k, v, o, *ins, down))
        other = total - (n_heads * head_params + n_kv * kv_params
                         + down.in_features * channel_params)
        assert other >= 0 and hidden == o.out_features, (other, hidden)
        out.append(LayerGroups(n_heads, n_kv, head_dim, down.in_features, head_params,
                               kv_params, channel_params, other))
    return out


def full_mask(model) -> StructuredMask:
    """Keep everything."""
    return [{"heads": torch.ones(g.n_heads, dtype=torch.bool),
             "mlp": torch.ones(g.n_channels, dtype=torch.bool)} for g in layer_groups(model)]


def _check_mask(groups: list[LayerGroups], mask: StructuredMask) -> None:
    if len(mask) != len(groups):
        raise ValueError(f"mask has {len(mask)} layers, the model {len(groups)}")
    for i, (g, m) in enumerate(zip(groups, mask)):
        if tuple(m["heads"].shape) != (g.n_heads,) or tuple(m["mlp"].shape) != (g.n_channels,):
            raise ValueError(f"layer {i}: mask shapes {tuple(m['heads'].shape)} / "
                             f"{tuple(m['mlp'].shape)} do not fit {g.n_heads} heads / "
                             f"{g.n_channels} channels")


def _kv_alive(g: LayerGroups, heads: torch.Tensor) -> torch.Tensor:
    """Bool [n_kv]: KV heads that still serve at least one kept query head."""
    return heads.bool().reshape(g.n_kv_heads, g.group_size).any(dim=1)


def removed_params(groups: list[LayerGroups], mask: StructuredMask) -> int:
    _check_mask(groups, mask)
    n = 0
    for g, m in zip(groups, mask):
        heads = m["heads"].bool().cpu()
        n += int((~heads).sum()) * g.head_params
        n += int((~_kv_alive(g, heads)).sum()) * g.kv_params
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
    adapter, lay = _layout(model)
    groups = layer_groups(model)
    _check_mask(groups, mask)
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


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return heads.bool().repeat_interleave(head_dim)


@torch.no_grad()
def zero_(model, mask: StructuredMask) -> None:
    """Write the mask into the weights: the removed heads' q rows (+ bias) and output-projection
    columns, dead KV heads' k/v rows (+ biases), removed channels' MLP-in rows (+ biases) and
    MLP-out columns become zero. Same logits as :func:`masked` and :func:`shrink_`."""
    adapter, lay = _layout(model)
    groups = layer_groups(model)
    _check_mask(groups, mask)
    for layer, g, m in zip(adapter.layers(model), groups, mask):
        heads = m["heads"].bool().cpu()
        drop_q = ~_head_rows(heads, g.head_dim)
        drop_kv = ~_head_rows(_kv_alive(g, heads), g.head_dim)
        drop_c = ~m["mlp"].bool().cpu()
        _zero_rows(layer.get_submodule(lay.q), drop_q)
        for name in (lay.k, lay.v):
            _zero_rows(layer.get_submodule(name), drop_kv)
        layer.get_submodule(lay.o).weight[:, drop_q.to(layer.get_submodule(lay.o).weight.device)] = 0
        for name in lay.mlp_in:
            _zero_rows(layer.get_submodule(name), drop_c)
        out = layer.get_submodule(lay.mlp_out)
        out.weight[:, drop_c.to(out.weight.device)] = 0


def _zero_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
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
    per-layer head counts updated. When all layers end up with the same widths (and, for OPT,
    the head count is unchanged) the config's head counts / MLP width are set to them, so the
    model saves as a plain Hugging Face checkpoint; otherwise the config keeps its widths and
    records the per-layer ones under ``config.llmprune_structured`` (load with
    :func:`llmprune.load_pretrained`)."""
    adapter, lay = _layout(model)
    groups = layer_groups(model)
    _check_mask(groups, mask)
    widths = [_layer_widths(g, m, i) for i, (g, m) in enumerate(zip(groups, mask))]
    for layer, g, m, (nh, nkv, _) in zip(adapter.layers(model), groups, mask, widths):
        heads = m["heads"].bool().cpu()
        q_idx = torch.nonzero(_head_rows(heads, g.head_dim)).squeeze(1)
        kv_idx = torch.nonzero(_head_rows(_kv_alive(g, heads), g.head_dim)).squeeze(1)
        c_idx = torch.nonzero(m["mlp"].bool().cpu()).squeeze(1)
        _slice_linear(layer.get_submodule(lay.q), rows=q_idx)
        _slice_linear(layer.get_submodule(lay.k), rows=kv_idx)
        _slice_linear(layer.get_submodule(lay.v), rows=kv_idx)
        _slice_linear(layer.get_submodule(lay.o), cols=q_idx)
        for name in lay.mlp_in:
            _slice_linear(layer.get_submodule(name), rows=c_idx)
        _slice_linear(layer.get_submodule(lay.mlp_out), cols=c_idx)
        _set_runtime_widths(layer, lay, nh, nkv, int(c_idx.numel()))
    _update_config(model, lay, groups, widths)


def _set_runtime_widths(layer: nn.Module, lay: StructuredLayout, n_heads: int, n_kv: int,
                        n_channels: int) -> None:
    attn = layer.get_submodule(lay.attention)
    if lay.heads_attr:
        setattr(attn, lay.heads_attr, n_heads)
    if lay.kv_groups_attr:
        setattr(attn, lay.kv_groups_attr, n_heads // n_kv)
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
        old = {k: getattr(config, k, None) for k in keys}
        new = {lay.heads_key: nh, lay.mlp_key: nc, lay.kv_key: nkv, "head_dim": head_dim}
        for k in keys:
            setattr(config, k, new[k])  # head_dim explicit: no longer hidden_size // heads
        if _config_valid(config):
            if hasattr(config, CONFIG_KEY):
                delattr(config, CONFIG_KEY)
            return
        # e.g. transformers' LlamaConfig insists on hidden_size % num_attention_heads == 0 even
        # with an explicit head_dim: keep the old widths and record the new ones instead
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


# ----------------------------------------------------------------------------- select
def _check_fraction(name: str, value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0) or math.isnan(value):
        raise UserError(f"--{name} must be a fraction in [0, 1), got {value!r}")


@dataclass
class _Unit:
    """One removable step of attention in a layer: a KV group (gqa='kv' / MHA) or one query head
    per KV group (a round of gqa='even'). ``rank`` orders the steps within a layer."""

    score: float
    layer: int
    rank: int
    heads: list[int]
    params: int


def _attention_units(scores: list[dict[str, torch.Tensor]], groups: list[LayerGroups],
                     gqa: str) -> list[list[_Unit]]:
    """Per layer, its removable attention steps in the order they must be taken (cheapest
    first); every layer keeps at least one query head per surviving KV group and one KV group."""
    out = []
    for i, (g, s) in enumerate(zip(groups, scores)):
        sc = s["heads"].detach().float().cpu().reshape(g.n_kv_heads, g.group_size)
        units = []
        if gqa == "kv" or g.group_size == 1:
            # whole KV groups, scored by the sum of their query heads' scores
            total = sc.sum(dim=1)
            order = torch.argsort(total, stable=True).tolist()
            for rank, j in enumerate(order[:-1]):  # the best group always stays
                heads = list(range(j * g.group_size, (j + 1) * g.group_size))
                units.append(_Unit(float(total[j]), i, rank, heads,
                                   g.group_size * g.head_params + g.kv_params))
        else:
            # round r removes the r-th least important query head of every KV group; rounds are
            # nested and their summed scores non-decreasing, so a global ranking takes them in
            # order. The most important head of each group always stays.
            order = torch.argsort(sc, dim=1, stable=True)  # [n_kv, group]
            for r in range(g.group_size - 1):
                cols = order[:, r]
                heads = [j * g.group_size + int(cols[j]) for j in range(g.n_kv_heads)]
                score = float(sc[torch.arange(g.n_kv_heads), cols].sum())
                units.append(_Unit(score, i, r, heads, g.n_kv_heads * g.head_params))
        out.append(units)
    return out


def _channel_order(scores, groups) -> list[torch.Tensor]:
    """Per layer, channel indices from least to most important (the last one always stays)."""
    return [torch.argsort(s["mlp"].detach().float().cpu(), stable=True) for s in scores]


def _take_attention(units: list[list[_Unit]], uniform: bool, *, count: int | None = None,
                    param_target: float | None = None) -> list[int]:
    """How many steps to take in every layer: ``count`` query heads in all (the nearest
    reachable), or ``param_target`` attention parameters (the nearest reachable)."""
    n_layers = len(units)
    if uniform:
        steps = min(len(u) for u in units)
        best, best_err = 0, math.inf
        for r in range(steps + 1):
            if count is not None:
                err = abs(sum(len(u[k].heads) for u in units for k in range(r)) - count)
            else:
                err = abs(sum(u[k].params for u in units for k in range(r)) - param_target)
            if err < best_err - 1e-9:
                best, best_err = r, err
        return [best] * n_layers
    # non-uniform: one global ranking of the steps (their within-layer order is kept because a
    # layer's step scores never decrease; ties broken by layer then rank)
    ranked = sorted((u for us in units for u in us), key=lambda u: (u.score, u.layer, u.rank))
    taken = [0] * n_layers
    done = 0.0
    goal = count if count is not None else param_target
    for u in ranked:
        size = len(u.heads) if count is not None else u.params
        if abs(done + size - goal) >= abs(done - goal):
            break
        if u.rank != taken[u.layer]:  # only possible with ties broken oddly; keep nesting
            continue
        taken[u.layer] += 1
        done += size
    return taken


def _take_channels(groups: list[LayerGroups], uniform: bool, count: float) -> list[int]:
    """Channels to remove per layer: ``count`` in all, nearest reachable, >= 1 kept per layer."""
    if uniform:
        n_layers = len(groups)
        cap = min(g.n_channels for g in groups) - 1
        return [max(0, min(cap, round(count / n_layers)))] * n_layers
    return [-1] * len(groups)  # filled by the global ranking in select()


def select(scores: list[dict[str, torch.Tensor]], groups: list[LayerGroups], *,
           sparsity: float | None = None, heads: float | None = None, mlp: float | None = None,
           uniform: bool = True, gqa: str = "even") -> StructuredMask:
    """Keep the most important groups so that the target holds.

    ``scores`` has the layout of a mask, higher = more important. Targets:

    * ``heads``: fraction of query heads removed; ``mlp``: fraction of MLP channels removed;
    * ``sparsity``: fraction of decoder-layer linear parameters removed. Given alone, attention
      loses the reachable amount nearest to ``sparsity`` of its own parameters (heads come in
      coarse steps), and the MLP then loses the channels that bring the total nearest to
      ``sparsity`` -- about the same fraction of each kind, the MLP absorbing the rounding. Given
      with ``heads`` (or ``mlp``), that kind is fixed and the other one makes up the total.

    ``uniform=True`` removes the same number of heads / channels in every layer (a plain HF
    config); ``uniform=False`` ranks each kind globally across layers. ``gqa="even"`` removes query
    heads evenly within KV groups (the same count from each); ``gqa="kv"`` removes whole KV groups,
    scored by the sum of their query heads. Every layer keeps at least one KV group, one query head
    per kept KV group and one MLP channel.
    """
    check_targets(sparsity=sparsity, heads=heads, mlp=mlp, gqa=gqa)
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} layers of scores for {len(groups)} layers of groups")
    _check_mask(groups, scores)

    units = _attention_units(scores, groups, gqa)
    total = sum(g.total_params for g in groups)
    attn_total = sum(g.n_heads * g.head_params + g.n_kv_heads * g.kv_params for g in groups)
    mlp_total = sum(g.n_channels for g in groups)
    ch_params = groups[0].channel_params

    # attention steps per layer
    if heads is not None:
        steps = _take_attention(units, uniform, count=heads * sum(g.n_heads for g in groups))
    elif sparsity is not None and mlp is None:
        steps = _take_attention(units, uniform, param_target=sparsity * attn_total)
    elif sparsity is not None:  # mlp fixed: attention makes up the total
        steps = _take_attention(units, uniform, param_target=max(
            0.0, sparsity * total - round(mlp * mlp_total) * ch_params))
    else:
        steps = [0] * len(groups)
    attn_removed = sum(u[k].params for u, r in zip(units, steps) for k in range(r))

    # channels in all
    if mlp is not None:
        n_channels = mlp * mlp_total
    elif sparsity is not None:
        n_channels = max(0.0, (sparsity * total - attn_removed) / ch_params)
    else:
        n_channels = 0.0

    order = _channel_order(scores, groups)
    per_layer = _take_channels(groups, uniform, n_channels)
    if not uniform:
        # global ranking of channels; the most important channel of each layer stays
        cand = [(float(scores[i]["mlp"][c]), i, k, int(c)) for i, o in enumerate(order)
                for k, c in enumerate(o[:-1].tolist())]
        cand.sort()
        per_layer = [0] * len(groups)
        for _, i, _, _ in cand[:max(0, min(len(cand), round(n_channels)))]:
            per_layer[i] += 1

    mask: StructuredMask = []
    for i, g in enumerate(groups):
        keep_h = torch.ones(g.n_heads, dtype=torch.bool)
        for u in units[i][:steps[i]]:
            keep_h[u.heads] = False
        keep_c = torch.ones(g.n_channels, dtype=torch.bool)
        keep_c[order[i][:per_layer[i]]] = False
        mask.append({"heads": keep_h, "mlp": keep_c})
    return mask


def describe(groups: list[LayerGroups], mask: StructuredMask) -> dict:
    """A JSON-able summary of a mask: per-layer kept heads (indices) and widths."""
    layers = []
    for g, m in zip(groups, mask):
        heads = m["heads"].bool().cpu()
        layers.append({"kept_heads": torch.nonzero(heads).squeeze(1).tolist(),
                       "n_heads": int(heads.sum()),
                       "n_kv_heads": int(_kv_alive(g, heads).sum()),
                       "intermediate_size": int(m["mlp"].bool().sum()),
                       "of": {"n_heads": g.n_heads, "n_kv_heads": g.n_kv_heads,
                              "intermediate_size": g.n_channels}})
    widths = {(x["n_heads"], x["n_kv_heads"], x["intermediate_size"]) for x in layers}
    return {"removed_fraction": removed_params(groups, mask) / sum(g.total_params for g in groups),
            "uniform": len(widths) == 1, "layers": layers}


# ----------------------------------------------------------------------------- save
def is_structured(config: dict) -> bool:
    return CONFIG_KEY in config


def save_structured(model, tokenizer, out_dir, mask: StructuredMask, meta: dict, *,
                    overwrite: bool = False) -> dict:
    """Shrink ``model`` in place with ``mask`` and write it to ``out_dir`` (atomically).

    Uniform widths (and no OPT head removed): a plain Hugging Face checkpoint
    (``AutoModelForCausalLM.from_pretrained`` loads it). Otherwise ``config.json`` records the
    per-layer widths under ``llmprune_structured``, the weights are in ``llmprune-structured*.safetensors``
    and ``model.safetensors.index.json`` points at a file named after ``llmprune.load_pretrained``
    that does not exist, so a plain ``from_pretrained`` fails with that name in its message.
    ``llmprune.json`` gets ``meta`` plus the format, the mask summary and the removed fraction.
    Returns the written llmprune.json content."""
    from .export import META_FILE
    from .output import atomic_dir, check_output

    out = check_output(out_dir, overwrite)
    groups = layer_groups(model)
    summary = describe(groups, mask)
    shrink_(model, mask)
    plain = not hasattr(model.config, CONFIG_KEY)
    info = {**meta, "format": STRUCTURED_FORMAT, "loads_with": (
        "AutoModelForCausalLM.from_pretrained" if plain else "llmprune.load_pretrained"),
        "removed_fraction": summary["removed_fraction"], "structured": summary}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not plain:
            _hide_weights(tmp)
        (tmp / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
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


# ----------------------------------------------------------------------------- one-shot baseline
IMPORTANCES = ("magnitude", "activation")


@torch.no_grad()
def magnitude_scores(model) -> list[dict[str, torch.Tensor]]:
    """L2 norm of each group's weights (the baseline importance, no data).

    A query head: its q rows (+ bias) and output-projection columns, plus its share
    (1 / group_size) of its KV head's k and v rows -- with multi-head attention (OPT) that is the
    head's own k/v. An MLP channel: its rows of the MLP input linears (+ biases) and its column of
    the MLP output linear."""
    adapter, lay = _layout(model)
    scores = []
    for layer, g in zip(adapter.layers(model), layer_groups(model)):
        def rows_sq(lin: nn.Linear, block: int) -> torch.Tensor:  # [out / block]
            sq = lin.weight.detach().float().pow(2).sum(dim=1)
            if lin.bias is not None:
                sq = sq + lin.bias.detach().float().pow(2)
            return sq.reshape(-1, block).sum(dim=1)

        q_sq = rows_sq(layer.get_submodule(lay.q), g.head_dim)  # [n_heads]
        o_sq = (layer.get_submodule(lay.o).weight.detach().float().pow(2).sum(dim=0)
                .reshape(g.n_heads, g.head_dim).sum(dim=1))
        kv_sq = (rows_sq(layer.get_submodule(lay.k), g.head_dim)
                 + rows_sq(layer.get_submodule(lay.v), g.head_dim))  # [n_kv]
        heads = q_sq + o_sq + kv_sq.repeat_interleave(g.group_size) / g.group_size
        ch = sum(rows_sq(layer.get_submodule(n), 1) for n in lay.mlp_in)
        ch = ch + layer.get_submodule(lay.mlp_out).weight.detach().float().pow(2).sum(dim=0)
        scores.append({"heads": heads.sqrt().cpu(), "mlp": ch.sqrt().cpu()})
    return scores


@torch.no_grad()
def activation_scores(model, calib_ids: torch.Tensor, batch_size: int = 4,
                      progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """L2 norm of each group's activations over the calibration tokens: a head's slice of the
    output projection's input (its attention output), a channel's input to the MLP output
    linear. Gathered with forward pre-hooks during plain forward passes (no autograd)."""
    from tqdm.auto import tqdm

    adapter, lay = _layout(model)
    groups = layer_groups(model)
    device = next(model.parameters()).device
    sums: list[dict[str, torch.Tensor]] = [
        {"heads": torch.zeros(g.n_heads * g.head_dim, dtype=torch.float64),
         "mlp": torch.zeros(g.n_channels, dtype=torch.float64)} for g in groups]
    handles = []

    def accumulate(acc: torch.Tensor):
        def hook(module, args):
            x = args[0].detach().float()
            acc.add_(x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0).double().cpu())
        return hook

    try:
        for layer, s in zip(adapter.layers(model), sums):
            handles.append(layer.get_submodule(lay.o).register_forward_pre_hook(
                accumulate(s["heads"])))
            handles.append(layer.get_submodule(lay.mlp_out).register_forward_pre_hook(
                accumulate(s["mlp"])))
        for batch in tqdm(calib_ids.split(batch_size), desc="activation norms", unit="batch",
                          disable=not progress):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [{"heads": s["heads"].reshape(g.n_heads, g.head_dim).sum(dim=1).sqrt().float(),
             "mlp": s["mlp"].sqrt().float()} for s, g in zip(sums, groups)]


def check_targets(*, sparsity=None, heads=None, mlp=None, gqa="even") -> None:
    """Validate a structured target before anything expensive runs (raises UserError)."""
    if gqa not in ("even", "kv"):
        raise UserError(f"--gqa must be even or kv, got {gqa!r}")
    for name, value in (("sparsity", sparsity), ("heads", heads), ("mlp", mlp)):
        _check_fraction(name, value)
    if sparsity is None and heads is None and mlp is None:
        raise UserError("give a target: --sparsity, or --heads and/or --mlp")
    if sparsity is not None and heads is not None and mlp is not None:
        raise UserError("--sparsity with both --heads and --mlp over-determines the target; "
                        "drop one of them")


def check_supported(model) -> None:
    """Raise a one-line UserError when the model's family has no structured layout."""
    _layout(model)


def prune_structured(model, *, importance: str = "magnitude", sparsity: float | None = None,
                     heads: float | None = None, mlp: float | None = None, uniform: bool = True,
                     gqa: str = "even", calib_ids: torch.Tensor | None = None,
                     batch_size: int = 4, progress: bool = True) -> tuple[StructuredMask, dict]:
    """The one-shot baseline: score every head and channel (``magnitude`` or ``activation``), then
    :func:`select`. Returns the mask (the model is not modified) and a summary."""
    if importance not in IMPORTANCES:
        raise UserError(f"--importance must be magnitude or activation, got {importance!r}")
    check_targets(sparsity=sparsity, heads=heads, mlp=mlp, gqa=gqa)
    check_supported(model)
    if importance == "activation":
        if calib_ids is None:
            raise UserError("activation importance needs calibration data")
        scores = activation_scores(model, calib_ids, batch_size, progress)
    else:
        scores = magnitude_scores(model)
    groups = layer_groups(model)
    mask = select(scores, groups, sparsity=sparsity, heads=heads, mlp=mlp, uniform=uniform,
                  gqa=gqa)
    return mask, describe(groups, mask)


# ----------------------------------------------------------------------------- loading
def is_structured_dir(src: Path) -> bool:
    from .export import CorruptCheckpointError

    try:
        return CONFIG_KEY in json.loads((src / "config.json").read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise CorruptCheckpointError(f"cannot read {src / 'config.json'}: {exc}") from None


def load_structured(src: Path, dtype: torch.dtype | None, trust_remote_code: bool):
    """A structured export with per-layer widths (``llmprune_structured`` in config.json): build
    the model from its config, shrink every layer to its recorded widths, then load the weights
    (every tensor must be there with exactly the shape the shrunk model wants)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .export import ST_DTYPES, CorruptCheckpointError, SafetensorsFiles, finish_load, no_init

    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    widths = getattr(config, CONFIG_KEY)["layers"]
    files = SafetensorsFiles(weight_files(src))
    stored = next((ST_DTYPES[info["dtype"]] for _, info, _ in files.entries.values()
                   if info["dtype"] in ("F32", "BF16", "F16")), torch.float32)
    with no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=stored,
                                                 trust_remote_code=trust_remote_code)
    try:
        shrink_to_widths(model, widths)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{src}: {exc}") from None
    params = model.state_dict()
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in files:
            if name not in params or tuple(params[name].shape) != tuple(tensor.shape):
                want = tuple(params[name].shape) if name in params else "no such tensor"
                raise CorruptCheckpointError(f"{src}: tensor {name} {tuple(tensor.shape)} does "
                                             f"not fit the recorded widths ({want})")
            params[name].copy_(tensor)
            loaded.add(name)
    return finish_load(model, params, loaded, src, dtype)
