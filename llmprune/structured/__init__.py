"""Structured pruning: attention heads and MLP channels, removed for real (smaller matrices),
with importance from weight magnitudes, activations, Bonsai or LoRAPrune."""

from .format import load_structured, save_structured
from .selection import IMPORTANCES, prune_structured, select
from .shrink import (LayerGroups, full_mask, layer_groups, masked, removed_fraction, shrink_,
                     zero_)

__all__ = ["IMPORTANCES", "LayerGroups", "full_mask", "layer_groups", "load_structured", "masked",
           "prune_structured", "removed_fraction", "save_structured", "select", "shrink_",
           "zero_"]
