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

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # attribute path from the CausalLM to the nn.ModuleList of decoder layers
    groups: tuple[tuple[str, ...], ...]  # linear names inside one layer; each tuple shares an input

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
register(Adapter("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", _LLAMA_GROUPS))

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
