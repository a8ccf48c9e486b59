"""Architecture adapters: where a family keeps its decoder layers and prunable linears.

Architecture differences are *data* here, never a copied calibration loop (the SliceGPT lesson).
An adapter names

* the path of the decoder-layer list inside the ``*ForCausalLM`` model, and
* the prunable linears of one decoder layer as *input groups*, in forward (true-sequential) order.
  Members of one group read the very same input tensor (q/k/v read the normed hidden state,
  gate/up read the normed residual), so they share one set of calibration statistics.

Adding a family is one ``register(Adapter(...))`` call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..core.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class StructuredLayout:
    """Where a family's structured groups live (used by :mod:`llmprune.structured`).

    Attention heads are row blocks of ``head_dim`` in q (and, per KV head, in k/v) and column
    blocks in the output projection; MLP channels are rows of the input linears and columns of
    the output linear. Names are relative to one decoder layer."""

    attention: str  # the attention module (holds head_dim and the per-layer head counts)
    q: str
    k: str
    v: str
    o: str  # output projection: head slices are its input columns
    mlp_in: tuple[str, ...]  # channel = one row of each (gate/up, fc1)
    mlp_out: str  # channel = one input column (down, fc2)
    mlp: str | None  # the MLP module whose ``intermediate_size`` attribute follows the width
    heads_key: str  # config keys
    kv_key: str | None  # None: multi-head attention (one KV head per query head)
    mlp_key: str
    # True: head_dim is a config field (set explicitly when heads change), so uniform head
    # pruning is a plain config. False (OPT): head_dim = hidden / heads is derived, so changing
    # the head count cannot be expressed in a plain config.
    head_dim_in_config: bool
    heads_attr: str | None  # attention attribute holding the query-head count at run time
    kv_groups_attr: str | None  # attention attribute holding heads // kv_heads at run time


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # attribute path from the CausalLM to the nn.ModuleList of decoder layers
    groups: tuple[tuple[str, ...], ...]  # linear names inside one layer; each tuple shares an input
    structured: StructuredLayout | None = None  # None: no head / channel pruning for this family

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The prunable linears of one decoder layer, by their name inside the layer."""
        return {name: layer.get_submodule(name) for name in self.linear_names}


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

# Llama, Mistral, Qwen2/3 and SmolLM share the pre-norm layout with a gated MLP.
# Qwen3's q/k norms act per head and would follow unchanged, but it is untested: no structured
# layout for it yet.
_LLAMA_STRUCTURED = StructuredLayout(
    attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
    o="self_attn.o_proj", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
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
            attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj",
            v="self_attn.v_proj", o="self_attn.out_proj", mlp_in=("fc1",), mlp_out="fc2",
            mlp=None, heads_key="num_attention_heads", kv_key=None, mlp_key="ffn_dim",
            head_dim_in_config=False, heads_attr="num_heads", kv_groups_attr=None),
    )
)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for_type(model_type: str) -> Adapter:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported model types: "
            f"{', '.join(supported_model_types())}"
        ) from None


def adapter_for(model: nn.Module) -> Adapter:
    return adapter_for_type(getattr(model.config, "model_type", type(model).__name__))
