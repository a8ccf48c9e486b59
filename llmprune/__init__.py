"""llmprune: post-training pruning of large language models."""

__version__ = "0.1.0"

from .api import (PerpConfig, calibration_ids, export_checkpoint, load_model,  # noqa: E402
                  load_pretrained, perp, perp_checkpoint, prune, prune_checkpoint,
                  prune_streaming, prune_structured, save_structured)
from .core.errors import UserError  # noqa: E402
from .core.sparsity import Sparsity  # noqa: E402
from .deprecated import install_moved_modules  # noqa: E402
from .engine.calibrate import Report  # noqa: E402
from .recipe import PruneRecipe  # noqa: E402

# the module paths of llmprune 0.1 (llmprune.export, ...) stay importable for one release, as
# deprecated aliases (llmprune.perp is the function; `from llmprune.perp import X` still works)
install_moved_modules()

__all__ = ["PruneRecipe", "Report", "Sparsity", "UserError", "calibration_ids", "export_checkpoint",
           "load_model", "load_pretrained", "PerpConfig", "perp", "perp_checkpoint",
           "prune", "prune_checkpoint", "prune_streaming", "prune_structured", "save_structured",
           "__version__"]
