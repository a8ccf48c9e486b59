"""The Python API: every public function of llmprune in one place. The CLI and recipes call the
same functions.

    import llmprune
    model, tok, _ = llmprune.load_model("smollm2-135m")
    recipe = llmprune.PruneRecipe(method, sparsity=0.5, nsamples=32, seqlen=512)
    report = llmprune.prune(model, recipe, tokenizer=tok)

where ``method`` is a name in ``llmprune.solvers.SOLVERS``.
"""

from .engine.prune import needs_calibration, prune, resolve_calib_dtype
from .io.data import calibration_ids
from .io.checkpoints import export_checkpoint
from .loaders import load_model, load_pretrained
from .retrain.perp import PerpConfig, perp
from .runs.perp import perp_checkpoint
from .runs.prune import prune_checkpoint, prune_meta, resolved_recipe
from .runs.streaming import prune_streaming
from .structured.format import save_structured
from .structured.selection import prune_structured

__all__ = ["PerpConfig", "calibration_ids", "export_checkpoint", "load_model", "load_pretrained",
           "needs_calibration", "perp", "perp_checkpoint", "prune", "prune_checkpoint",
           "prune_meta", "prune_streaming", "prune_structured", "resolve_calib_dtype",
           "resolved_recipe", "save_structured"]
