"""Structured pruning: attention heads and MLP channels, removed for real (smaller matrices),
with importance from weight magnitudes, activations, Bonsai or LoRAPrune.

The package exports the public names of :mod:`.shrink` (groups, masks, shrinking),
:mod:`.selection` (importance and selection) and :mod:`.format` (the file format)."""

from ..io.meta import STRUCTURED_FORMAT
from .format import (SIGNPOST, WEIGHTS_INDEX, WEIGHTS_NAME, is_structured, is_structured_dir,
                     load_structured, save_structured, weight_files)
from .selection import (IMPORTANCES, activation_scores, check_supported, check_targets, describe,
                        magnitude_scores, prune_structured, select)
from .shrink import (CONFIG_KEY, LayerGroups, StructuredMask, full_mask, layer_groups, masked,
                     removed_fraction, removed_params, shrink_, shrink_to_widths, zero_)

__all__ = ["CONFIG_KEY", "IMPORTANCES", "SIGNPOST", "STRUCTURED_FORMAT", "WEIGHTS_INDEX",
           "WEIGHTS_NAME", "LayerGroups", "StructuredMask", "activation_scores",
           "check_supported", "check_targets", "describe", "full_mask", "is_structured",
           "is_structured_dir", "layer_groups", "load_structured", "magnitude_scores", "masked",
           "prune_structured", "removed_fraction", "removed_params", "save_structured", "select",
           "shrink_", "shrink_to_widths", "weight_files", "zero_"]
