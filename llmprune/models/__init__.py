"""Architecture adapters: where a family keeps its decoder layers and prunable linears.

Architecture differences are *data* here, never a copied calibration loop (the SliceGPT lesson).
An adapter gives

* the path of the decoder-layer list inside the ``*ForCausalLM`` model, and
* the prunable linears of one decoder layer as *input groups*, in forward (true-sequential) order.
  Members of one group read the very same input tensor (q/k/v read the normed hidden state,
  gate/up read the normed residual), so they share one set of calibration statistics.

Any decoder-only model gets an adapter found from the model itself
(:mod:`llmprune.models.discovery`: its layers from ``_no_split_modules``, its linears by type, its
groups by watching one forward pass of a layer). A registered adapter (``register(Adapter(...))``)
overrides what discovery would find for its ``model_type``s: it declares the groups (so they are
known before any weight is loaded), and may declare a ``StructuredLayout`` for head / channel
pruning; every other family's is found from its layers and config
(:mod:`llmprune.models.structured`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

from ..core.errors import UnsupportedArchitectureError
from .discovery import (expert_count, find_layers_path, layer_signature, prunable_linears,
                        watch_groups)
from .structured import StructuredLayout, derive_layout

Groups = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # attribute path from the CausalLM to the nn.ModuleList of decoder layers
    # linear names inside one layer, each tuple sharing an input; None: every nn.Linear of a
    # layer, grouped by watching a forward pass (:meth:`groups_of`)
    groups: Groups | None = None
    # None: found from the model when asked for (:func:`structured_layout`)
    structured: StructuredLayout | None = None
    experts: int | None = None  # routed experts per MoE layer (their routers are not pruned)
    # discovered groups by layer signature, filled as layers are watched (one model's adapter)
    watched: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def linear_names(self) -> tuple[str, ...]:
        """The declared linears of every layer (a registered adapter only)."""
        if self.groups is None:
            raise TypeError(f"adapter {self.name!r} finds its linears per layer: use linears()")
        return tuple(name for group in self.groups for name in group)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The prunable linears of one decoder layer, by their name inside the layer."""
        if self.groups is None:
            return prunable_linears(layer, self.experts)
        return {name: layer.get_submodule(name) for name in self.linear_names}

    def knows_groups(self, layer: nn.Module) -> bool:
        """Whether :meth:`groups_of` ``layer`` without a probe gives its real input groups
        (declared, or watched on a layer of the same kind), not one group per linear."""
        return self.groups is not None or \
            layer_signature(layer, self.linears(layer)) in self.watched

    def groups_of(self, layer: nn.Module, probe: Callable[[], object] | None = None) -> Groups:
        """The input groups of ``layer`` in forward order. Declared ones as they are; else
        watched while ``probe()`` runs one forward pass of the layer (once per kind of layer).
        Without a probe and not yet watched (no calibration data, or a memory plan made before
        any weight is read): one group per linear, in module order."""
        if self.groups is not None:
            return self.groups
        lins = self.linears(layer)
        key = layer_signature(layer, lins)
        if key not in self.watched:
            if probe is None:
                return tuple((name,) for name in lins)
            self.watched[key] = watch_groups(lins, probe)
        return self.watched[key]


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

# Llama, Mistral, Qwen2/3 and SmolLM share the pre-norm layout with a gated MLP. Qwen3 (q/k norms
# per head) has its structured layout found like any other family's (:func:`structured_layout`).
_LLAMA_STRUCTURED = StructuredLayout(
    attention="self_attn", rows=(("self_attn.q_proj", ("q",)), ("self_attn.k_proj", ("k",)),
                                 ("self_attn.v_proj", ("v",)), ("mlp.gate_proj", ("mlp",)),
                                 ("mlp.up_proj", ("mlp",))),
    o="self_attn.o_proj", mlp_out="mlp.down_proj",
    mlp="mlp", heads_key="num_attention_heads", kv_key="num_key_value_heads",
    mlp_key="intermediate_size", head_dim_in_config=True, heads_attr=None,
    kv_groups_attr="num_key_value_groups")
register(Adapter("llama", ("llama", "mistral", "qwen2"), "model.layers", _LLAMA_GROUPS,
                 _LLAMA_STRUCTURED))
register(Adapter("qwen3", ("qwen3",), "model.layers", _LLAMA_GROUPS))

register(
    Adapter(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        StructuredLayout(
            attention="self_attn", rows=(("self_attn.q_proj", ("q",)), ("self_attn.k_proj", ("k",)),
                                         ("self_attn.v_proj", ("v",)), ("fc1", ("mlp",))),
            o="self_attn.out_proj", mlp_out="fc2", mlp=None, heads_key="num_attention_heads", kv_key=None, mlp_key="ffn_dim",
            head_dim_in_config=False, heads_attr="num_heads", kv_groups_attr=None),
    )
)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def discover(model: nn.Module) -> Adapter:
    """The adapter of a model no registered adapter covers, found from the model itself."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    path = find_layers_path(model)
    if path is None:
        raise UnsupportedArchitectureError(
            f"cannot find decoder layers in {type(model).__name__} (model type {model_type!r}): "
            f"no nn.ModuleList of blocks holding nn.Linear layers; llmprune prunes decoder-only "
            f"models whose layers are such a list")
    return Adapter(model_type, (model_type,), path, experts=expert_count(model.config))


def adapter_for(model: nn.Module) -> Adapter:
    """The registered adapter of ``model``'s type, else one discovered from the model."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    return discover(model)


def structured_layout(model: nn.Module) -> StructuredLayout:
    """Where ``model``'s attention heads and MLP channels live: its registered adapter's layout,
    else one found from its layers and config (:func:`llmprune.models.structured.derive_layout`,
    which raises a one-line :class:`UnsupportedArchitectureError` where structured pruning does
    not apply)."""
    adapter = adapter_for(model)
    if adapter.structured is not None:
        return adapter.structured
    return derive_layout(adapter.layers(model), model.config, adapter.experts)
