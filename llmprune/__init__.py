"""llmprune: post-training pruning of large language models."""

__version__ = "0.1.0"

from .api import calibration_ids, prune, prune_checkpoint  # noqa: E402
from .calibrate import Report  # noqa: E402
from .core.errors import UserError  # noqa: E402
from .export import export_checkpoint  # noqa: E402
from .core.sparsity import Sparsity  # noqa: E402
from .loaders import load_model, load_pretrained  # noqa: E402
# llmprune.perp is the function below (the module stays importable as llmprune.perp in
# `from llmprune.perp import ...`, through sys.modules)
from .perp import PerpConfig, perp, perp_checkpoint  # noqa: E402
from .recipe import PruneRecipe  # noqa: E402
from .streaming import prune_streaming  # noqa: E402
from .structured import prune_structured, save_structured  # noqa: E402

__all__ = ["PruneRecipe", "Report", "Sparsity", "UserError", "calibration_ids", "export_checkpoint",
           "load_model", "load_pretrained", "PerpConfig", "perp", "perp_checkpoint",
           "prune", "prune_checkpoint", "prune_streaming", "prune_structured", "save_structured",
           "__version__"]
