"""Where a decoder layer's structured groups live: attention heads and MLP channels.

A :class:`StructuredLayout` names, inside one decoder layer, the linears whose output *rows*
belong to heads or channels (``rows``, each with the kinds of its row blocks in order, so a fused
``qkv_proj`` is ``("q", "k", "v")``) and the two linears whose input *columns* do (the attention
output projection ``o`` and the MLP output linear ``mlp_out``).

Registered adapters declare their layout (:mod:`llmprune.models`); every other family gets one
found from the model and its config by :func:`derive_layout`, without reading a module name for
its meaning:

* the attention module is the one module of the layer with an integer ``head_dim`` (or
  ``head_size``) attribute that holds linears;
* its linears are told apart by shape, read from the layer itself (so an already shrunk layer is
  described correctly): the output projection maps whole heads to ``hidden_size`` (the last
  registered such linear, as in every transformers attention class, where q may have the same
  shape), its input width gives the query heads; q is the first other linear with that many
  rows, k and v the two after it, with whole KV heads each;
* the MLP is every other linear of the layer, inside one module: its output linear maps the width
  ``W`` to ``hidden_size`` (the last registered such linear), its input linears give ``W`` rows
  each; ``W`` must be the value of a config key (``intermediate_size`` and the like);
* the config keys are ``num_attention_heads``, ``num_key_value_heads`` (absent: multi-head
  attention) and ``head_dim`` where the config has it; the attention module's
  ``num_key_value_groups`` (and head-count attributes, where it has them) follow a shrink.

What shapes cannot say is declared per family with :func:`register_hints`: the row order of a
fused projection (``[q; k; v]`` blocks, ``[gate; up]``, or q, k and v repeated per KV head as in
Falcon's and GPT-NeoX's ``query_key_value``), whether the attention reads its head count from the
shared config at run time (then every layer keeps the same head count), and config flags under
which no head can go (Falcon's ALiBi).

A family whose attention cannot lose heads exactly (a fused projection of unknown row order, a
norm over all heads together, as OLMo 2's ``q_norm``, or a declared config flag) gets a layout
with ``fixed_heads`` set to the reason: its MLP channels can still be pruned. Mixture-of-experts
layers and layers without attention heads (linear attention, state-space, convolution) get one
clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..core.errors import UnsupportedArchitectureError

KINDS = ("q", "k", "v", "mlp")
# config keys that may hold the MLP width, tried in this order (the first one equal to it wins)
MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner")
# attention attributes that hold the per-layer head counts at run time
HEADS_ATTRS = ("num_heads", "num_attention_heads")
KV_HEADS_ATTRS = ("num_key_value_heads", "num_kv_heads")
KV_GROUPS_ATTR = "num_key_value_groups"


@dataclass(frozen=True)
class StructuredLayout:
    """Where a family's structured groups live (used by :mod:`llmprune.structured`).

    Attention heads are row blocks of ``head_dim`` in q (and, per KV head, in k/v) and column
    blocks in the output projection; MLP channels are rows of the input linears and columns of
    the output linear. Names are relative to one decoder layer."""

    attention: str  # the attention module (holds head_dim and the per-layer head counts)
    # (linear, kinds of its row blocks in order): kinds q / k / v (sizes heads * head_dim,
    # kv_heads * head_dim) and mlp (the MLP width); one block per linear unless it is fused
    rows: tuple[tuple[str, tuple[str, ...]], ...]
    o: str  # output projection: head slices are its input columns
    mlp_out: str  # channel = one input column (down, fc2)
    mlp: str | None  # the MLP module whose ``intermediate_size`` attribute follows the width
    heads_key: str  # config keys
    kv_key: str | None  # None: multi-head attention (one KV head per query head)
    mlp_key: str
    # True: head_dim is a config field (set explicitly when heads change), so uniform head
    # pruning is a plain config. False (OPT, Falcon, GPT-NeoX): head_dim = hidden / heads is
    # derived, so changing the head count cannot be expressed in a plain config.
    head_dim_in_config: bool
    heads_attr: str | None  # attention attribute holding the query-head count at run time
    kv_groups_attr: str | None  # attention attribute holding heads // kv_heads at run time
    kv_heads_attr: str | None = None  # attention attribute holding the KV-head count
    other: tuple[str, ...] = ()  # linears in no group (attention inputs when heads are fixed)
    fixed_heads: str | None = None  # why no head can be removed (None: heads can go)
    uniform_heads: str | None = None  # why every layer must keep the same head count
    # fused row linears whose blocks repeat once per KV head: rows [kv_heads, kinds, head_dim],
    # a q block holding that KV head's query heads (Falcon, GPT-NeoX ``query_key_value``)
    per_kv_head: tuple[str, ...] = ()

    def names(self, kind: str) -> tuple[str, ...]:
        """The linears holding row blocks of ``kind``, in layout order."""
        return tuple(dict.fromkeys(name for name, kinds in self.rows if kind in kinds))

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of the layout (rows, output projection, MLP output, others)."""
        return tuple(dict.fromkeys([n for n, _ in self.rows] + [self.o, self.mlp_out,
                                                                 *self.other]))

    def row_index(self, n_heads: int, n_kv: int, head_dim: int, n_channels: int
                  ) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """kind -> ``[(linear, rows)]``: every row linear holding the rows of ``kind`` in a layer
        with these widths, and which of its rows they are (LongTensor, in the kind's order: q
        head-major, ``[n_heads * head_dim]``; k, v ``[n_kv * head_dim]``; mlp
        ``[n_channels]``). A linear holding two blocks of one kind (``[gate; up]``) appears
        twice."""
        size = {"q": n_heads * head_dim, "k": n_kv * head_dim, "v": n_kv * head_dim,
                "mlp": n_channels}
        out: dict[str, list[tuple[str, torch.Tensor]]] = {k: [] for k in KINDS}
        for name, kinds in self.rows:
            units = n_kv if name in self.per_kv_head else 1
            # [units, the kinds' rows of one unit]: the blocks in order within each unit
            rows = torch.arange(sum(size[k] for k in kinds)).reshape(units, -1)
            start = 0
            for kind in kinds:
                width = size[kind] // units
                out[kind].append((name, rows[:, start:start + width].reshape(-1)))
                start += width
        return out


@dataclass(frozen=True)
class StructuredHints:
    """What a family's shapes cannot say (:func:`register_hints`). ``fused`` maps a linear's
    name inside the layer to the kinds of its row blocks in order, e.g.
    ``{"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("mlp", "mlp")}``;
    ``per_kv_head`` names the fused linears whose blocks repeat once per KV head (rows
    ``[kv_heads, kinds, head_dim]``, a q block holding the KV head's query heads);
    ``uniform_heads`` says why the head count must be the same in every layer (the attention
    reads it from the shared config at run time); ``fixed_heads_when`` holds
    ``(config key, reason)``: where the key is true in the config, no head can be removed."""

    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    per_kv_head: tuple[str, ...] = ()
    uniform_heads: str | None = None
    fixed_heads_when: tuple[tuple[str, str], ...] = ()


_HINTS: dict[str, StructuredHints] = {}


def register_hints(model_types: tuple[str, ...], hints: StructuredHints) -> StructuredHints:
    for model_type in model_types:
        _HINTS[model_type] = hints
    return hints


def hints_for(model_type: str) -> StructuredHints:
    return _HINTS.get(model_type, StructuredHints())


# Phi-3 / Phi-4: q, k, v fused in that order, gate and up fused (``chunk(2)``); the attention
# slices q out of qkv with ``config.num_attention_heads``.
register_hints(("phi3",), StructuredHints(
    fused=(("self_attn.qkv_proj", ("q", "k", "v")), ("mlp.gate_up_proj", ("mlp", "mlp"))),
    uniform_heads="phi3 reads the head count from the shared config at run time"))
# GLM / GLM-4: gate and up fused (``chunk(2)``)
register_hints(("glm", "glm4"), StructuredHints(fused=(("mlp.gate_up_proj", ("mlp", "mlp")),)))
# GPT-NeoX: ``query_key_value`` rows are [heads, 3 (q, k, v), head_size] (``view(..., -1,
# 3 * head_size)`` then ``chunk(3)``): one KV head per query head.
register_hints(("gpt_neox",), StructuredHints(
    fused=(("attention.query_key_value", ("q", "k", "v")),),
    per_kv_head=("attention.query_key_value",)))
# Falcon: ``query_key_value`` rows are [kv_heads, q_per_kv + 2, head_dim] in all three layouts
# (new_decoder_architecture: grouped; multi_query: one KV head, so all q heads, then k, then v;
# otherwise [heads, 3, head_dim], one KV head per query head). With ALiBi the model builds one
# bias slope per head from config.num_attention_heads, so no head can go.
register_hints(("falcon",), StructuredHints(
    fused=(("self_attention.query_key_value", ("q", "k", "v")),),
    per_kv_head=("self_attention.query_key_value",),
    fixed_heads_when=(("alibi", "its ALiBi position biases are built per head from "
                                "config.num_attention_heads at run time"),)))


# ----------------------------------------------------------------------------- derivation
class _Refusal(Exception):
    """A reason this family has no structured layout (turned into one user error)."""


def _attention(layer: nn.Module) -> tuple[str, nn.Module, int]:
    found = [(name, mod) for name, mod in layer.named_modules()
             if name and any(isinstance(getattr(mod, a, None), int) and
                             not isinstance(getattr(mod, a), bool)
                             for a in ("head_dim", "head_size"))
             and any(isinstance(m, nn.Linear) for m in mod.modules())]
    if len(found) != 1:
        raise _Refusal(f"{type(layer).__name__} has {len(found)} attention modules with a "
                       "head_dim (linear attention, state-space or convolution layers have none)")
    name, mod = found[0]
    head_dim = getattr(mod, "head_dim", None)
    return name, mod, int(head_dim if isinstance(head_dim, int) else mod.head_size)


def _linears(module: nn.Module, prefix: str) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` of every linear inside ``module``, in module order. A wrapper around a
    linear (a peft LoRA layer: a ``base_layer`` linear beside its adapters) counts as that linear
    under the wrapper's name; nothing inside it counts again."""
    out: list[tuple[str, nn.Linear]] = []
    inside: str | None = None
    for name, mod in module.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        base = getattr(mod, "base_layer", None)
        lin = mod if isinstance(mod, nn.Linear) else base if isinstance(base, nn.Linear) else None
        if lin is not None:
            out.append((f"{prefix}.{name}" if prefix else name, lin))
            inside = name + "."
    return out


def _spans(module: nn.Module, linears: list[str], sizes: set[int]) -> str | None:
    """The name of a tensor of ``module`` outside the ``linears`` (names inside ``module``) with
    a dimension in ``sizes`` (it would have to lose entries with a head or channel), or None."""
    for name, sub in module.named_modules():
        if any(name == n or name.startswith(n + ".") for n in linears):
            continue
        for pname, t in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            if t is not None and any(d in sizes for d in t.shape):
                return f"{name}.{pname}" if name else pname
    return None


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> str | None:
    for a in names:
        v = getattr(module, a, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return a
    return None


def _attention_rows(attn_name: str, attn: nn.Module, head_dim: int, hidden: int,
                    hints: StructuredHints, fixed: str | None):
    """(rows, o, other, fixed_heads) of the attention module, from its linears' shapes (the
    head counts are the layer's own, so an already shrunk layer is read correctly). ``fixed``:
    why no head can go (from the config), or None."""
    lins = _linears(attn, attn_name)
    outs = [n for n, m in lins if m.out_features == hidden and m.in_features % head_dim == 0]
    if not outs:
        raise _Refusal(f"no attention output projection maps heads of {head_dim} to {hidden}")
    o = outs[-1]
    q_rows = dict(lins)[o].in_features
    rest = [(n, m) for n, m in lins if n != o]
    if fixed:
        return (), o, tuple(n for n, _ in rest), fixed
    fused = dict(hints.fused)
    if len(rest) == 1 and rest[0][0] in fused:
        name, lin = rest[0]
        kinds = fused[name]
        kv_rows, r = divmod(lin.out_features - q_rows, 2)
        if (sorted(kinds) != ["k", "q", "v"] or r or kv_rows <= 0 or kv_rows % head_dim
                or (q_rows // head_dim) % (kv_rows // head_dim)):
            raise _Refusal(f"{name} does not hold the declared blocks {kinds}")
        return ((name, kinds),), o, (), None
    if len(rest) == 1:
        return (), o, (rest[0][0],), (
            f"its fused {rest[0][0]} holds q, k and v in a row order llmprune does not know "
            "(declare it with llmprune.models.structured.register_hints)")
    if len(rest) != 3 or any(m.in_features != hidden for _, m in rest):
        return (), o, tuple(n for n, _ in rest), (
            f"its attention has {len(rest)} input projections, not q, k and v (e.g. low-rank "
            "or multi-latent attention)")
    qs = [x for x in rest if x[1].out_features == q_rows]
    if not qs:
        raise _Refusal(f"no attention projection gives the {q_rows} rows its output "
                       "projection reads")
    q = qs[0]
    k, v = [x for x in rest if x is not q]
    kv_rows = k[1].out_features
    if v[1].out_features != kv_rows or kv_rows % head_dim or (q_rows // head_dim) % (
            kv_rows // head_dim):
        raise _Refusal(f"k and v give {k[1].out_features} and {v[1].out_features} rows, not "
                       f"whole KV heads of {head_dim} serving {q_rows // head_dim} query heads")
    spans = _spans(attn, [n[len(attn_name) + 1:] for n, _ in lins], {q_rows, kv_rows} - {head_dim})
    if spans:
        return (), o, (q[0], k[0], v[0]), (
            f"{attn_name}.{spans} spans all heads together (removing a head would change the "
            "others)")
    return ((q[0], ("q",)), (k[0], ("k",)), (v[0], ("v",))), o, (), None


def _mlp_rows(layer: nn.Module, attn_name: str, hidden: int, hints: StructuredHints):
    """(rows, mlp_out, mlp module name, width) of the MLP linears (every linear of the layer
    outside the attention module)."""
    lins = [(n, m) for n, m in _linears(layer, "")
            if not (n == attn_name or n.startswith(attn_name + "."))]
    outs = [n for n, m in lins if m.out_features == hidden]
    if not outs:
        raise _Refusal("no MLP output linear maps to hidden_size")
    mlp_out = outs[-1]
    width = dict(lins)[mlp_out].in_features
    fused = dict(hints.fused)
    rows = []
    for name, lin in lins:
        if name == mlp_out:
            continue
        kinds = fused.get(name, ("mlp",))
        if lin.in_features != hidden or lin.out_features != width * len(kinds) or set(
                kinds) != {"mlp"}:
            raise _Refusal(f"MLP linear {name} ({lin.in_features} -> {lin.out_features}) is not "
                           f"an input linear of width {width}")
        rows.append((name, kinds))
    if not rows:
        raise _Refusal("the MLP has no input linear")
    parent = mlp_out.rpartition(".")[0] or None
    if parent is None:
        raise _Refusal("the MLP linears are not inside one MLP module")
    spans = _spans(layer.get_submodule(parent), [n[len(parent) + 1:] for n, _ in lins
                                                  if n.startswith(parent + ".")],
                   {width} - {hidden})
    if spans:
        raise _Refusal(f"{parent}.{spans} has the MLP width {width} but is not a linear")
    return tuple(rows), mlp_out, parent, width


def _layer_layout(layer: nn.Module, hidden: int, hints: StructuredHints, fixed: str | None
                  ) -> tuple[StructuredLayout, int]:
    """The layout of one layer (config keys left blank) and its head_dim."""
    attn_name, attn, head_dim = _attention(layer)
    rows, o, other, fixed = _attention_rows(attn_name, attn, head_dim, hidden, hints, fixed)
    mlp_rows, mlp_out, mlp, width = _mlp_rows(layer, attn_name, hidden, hints)
    return StructuredLayout(
        attention=attn_name, rows=rows + mlp_rows, o=o, mlp_out=mlp_out, mlp=mlp,
        heads_key="", kv_key=None, mlp_key="", head_dim_in_config=False,
        heads_attr=_int_attr(attn, HEADS_ATTRS), kv_groups_attr=_int_attr(attn, (KV_GROUPS_ATTR,)),
        kv_heads_attr=_int_attr(attn, KV_HEADS_ATTRS), other=other, fixed_heads=fixed,
        uniform_heads=hints.uniform_heads,
        per_kv_head=tuple(n for n, _ in rows if n in hints.per_kv_head)), head_dim


def _config_fixes_heads(config, hints: StructuredHints) -> str | None:
    """Why no head can go under this config (the first declared flag that is true), or None."""
    return next((reason for key, reason in hints.fixed_heads_when
                 if getattr(config, key, False)), None)


def _head_dim_field(config, head_dim: int) -> bool:
    """Whether ``head_dim`` is a config field holding the layers' head_dim (one that can be set
    when heads change), not derived from the head count (Falcon's ``head_dim`` property)."""
    derived = isinstance(getattr(type(config), "head_dim", None), property)
    return not derived and getattr(config, "head_dim", None) == head_dim


def _mlp_key(config, widths: set[int]) -> str | None:
    """The config key of the MLP width: the first one equal to a layer's width, else (layers
    shrunk to other widths, the config keeping the old one) the first at least every width."""
    values = {k: getattr(config, k) for k in MLP_WIDTH_KEYS
              if isinstance(getattr(config, k, None), int)}
    return (next((k for k, v in values.items() if v in widths), None)
            or next((k for k, v in values.items() if v >= max(widths)), None))


def derive_layout(layers: nn.ModuleList, config, experts: int | None = None) -> StructuredLayout:
    """The structured layout of a family without a declared one, found from its decoder
    ``layers`` and ``config`` (see the module docstring). Every layer must have the same
    layout; raises :class:`UnsupportedArchitectureError` (one line) where structured pruning
    cannot apply."""
    model_type = getattr(config, "model_type", "?")
    head = f"structured pruning (heads / MLP channels) does not apply to model type {model_type!r}"
    if experts:
        raise UnsupportedArchitectureError(
            f"{head}: its MLPs are mixtures of {experts} experts; prune whole experts with "
            "`llmprune experts`, or their weights with sparsegpt / wanda")
    hints = hints_for(model_type)
    fixed = _config_fixes_heads(config, hints)
    hidden = config.hidden_size
    layouts, widths, head_dims = set(), set(), set()
    for i, layer in enumerate(layers):
        try:
            lay, head_dim = _layer_layout(layer, hidden, hints, fixed)
        except _Refusal as exc:
            raise UnsupportedArchitectureError(f"{head}: layer {i}: {exc}") from None
        layouts.add(lay)
        head_dims.add(head_dim)
        widths.add(dict(_linears(layer, ""))[lay.mlp_out].in_features)
    if len(layouts) != 1 or len(head_dims) != 1:
        raise UnsupportedArchitectureError(f"{head}: its layers are of different kinds")
    if not isinstance(getattr(config, "num_attention_heads", None), int):
        raise UnsupportedArchitectureError(f"{head}: its config has no num_attention_heads")
    mlp_key = _mlp_key(config, widths)
    if mlp_key is None:
        raise UnsupportedArchitectureError(
            f"{head}: no config key ({', '.join(MLP_WIDTH_KEYS)}) holds its MLP width "
            f"{sorted(widths)[-1]}")
    kv_key = ("num_key_value_heads" if isinstance(getattr(config, "num_key_value_heads", None),
                                                  int) else None)
    lay = layouts.pop()
    return replace(lay, heads_key="num_attention_heads", kv_key=kv_key, mlp_key=mlp_key,
                   head_dim_in_config=_head_dim_field(config, head_dims.pop()))


__all__ = ["KINDS", "MLP_WIDTH_KEYS", "StructuredHints", "StructuredLayout", "derive_layout",
           "hints_for", "register_hints"]
