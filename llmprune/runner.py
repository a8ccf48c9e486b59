"""YAML recipes: a model and a list of stages, run by ``llmprune run RECIPE.yaml``.

    model: smollm2-135m
    stages:
      - sparsegpt: {pattern: "2:4", nsamples: 32, seqlen: 512}
      - export: {format: compact, dtype: bf16}
      - eval: {ppl: wikitext2, seqlen: 1024, max_windows: 16}

Stages, in this order: one solver (``magnitude``, ``wanda``, ``sparsegpt``; its keys are the
fields of :class:`llmprune.PruneRecipe`, including ``allocation: owl``), then optionally
``perp`` (PERP retraining, the fields of :class:`llmprune.perp.PerpConfig`), ``export`` and
``eval``. Unknown stages and keys are refused with the nearest valid name.
``--set stage.key=value`` overrides a value (``--set sparsegpt.nsamples=64``, ``--set
model=./ckpt``). Every pruning run, from the CLI or from a recipe, writes the recipe that
reproduces it as ``recipe.yaml`` into its output.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from .core.errors import UserError
from .io.lock import output_lock
from .recipe import PruneRecipe, dump
from .solvers import SOLVERS

EXPORT_KEYS = {"format": "dense", "dtype": "auto"}
EVAL_KEYS = {"ppl": None, "seqlen": 1024, "max_windows": 16, "tasks": None, "limit": None,
             "num_fewshot": None, "include_path": None, "batch_size": 1}
TOP_KEYS = {"model", "stages", "output"}
# Running the model folder's own Python is the caller's decision alone (--trust-remote-code, or
# trust_remote_code=True from Python): a recipe is a file people share, so it cannot set it.
CALLER_ONLY_KEYS = {"trust_remote_code"}


def _nearest(word: str, options) -> str:
    close = difflib.get_close_matches(word, sorted(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(options))}"


def _refuse_caller_only(given: dict, where: str) -> None:
    for key in CALLER_ONLY_KEYS & set(given):
        raise UserError(f"{where} sets {key!r}, which only the command line may set; remove it "
                        "and pass --trust-remote-code to 'llmprune run' if you trust the "
                        "model's own code")


def _check_keys(where: str, given: dict, valid) -> None:
    for key in given:
        if key not in valid:
            raise UserError(f"unknown key {key!r} in {where}{_nearest(key, valid)}")


def validate(data: dict) -> dict:
    """Check a recipe's structure and keys; return it normalised (``{stage: {args}}`` list)."""
    if not isinstance(data, dict):
        raise UserError("a recipe is a YAML mapping with 'model' and 'stages'")
    _refuse_caller_only(data, "the recipe")
    _check_keys("the recipe", data, TOP_KEYS)
    if "model" not in data or "stages" not in data:
        raise UserError("a recipe needs 'model' and 'stages'")
    stages = []
    kinds = set(SOLVERS) | {"export", "eval", "perp"}
    for i, stage in enumerate(data["stages"] or []):
        if isinstance(stage, str):
            stage = {stage: {}}
        if not isinstance(stage, dict) or len(stage) != 1:
            raise UserError(f"stage {i + 1} must be one mapping like 'sparsegpt: {{...}}'")
        (kind, args), = stage.items()
        args = dict(args or {})
        if kind not in kinds:
            raise UserError(f"unknown stage {kind!r}{_nearest(kind, kinds)}")
        valid = PruneRecipe.keys(kind) if kind in SOLVERS else (
            {"export": EXPORT_KEYS, "perp": _perp_keys()}.get(kind, EVAL_KEYS))
        _check_keys(f"stage {kind}", args, valid)
        stages.append({kind: args})
    order = [next(iter(s)) for s in stages]
    solvers = [k for k in order if k in SOLVERS]
    if len(solvers) != 1 or order[0] not in SOLVERS:
        raise UserError("a recipe has exactly one solver stage, first (then export, eval)")
    if len(set(order)) != len(order):
        raise UserError("each stage may appear once")
    if "perp" in order and order.index("perp") != 1:
        raise UserError("the perp stage comes right after the solver (then export, eval)")
    return {**data, "stages": stages}


def _perp_keys() -> set[str]:
    from .retrain.perp import PerpConfig

    return PerpConfig.keys()


def _parse_value(text: str):
    return yaml.safe_load(text) if text != "" else None


def apply_sets(data: dict, sets: list[str]) -> dict:
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set expects stage.key=value or key=value, got {item!r}")
        path, value = item.split("=", 1)
        value = _parse_value(value)
        if "." not in path:
            _refuse_caller_only({path: None}, f"--set {item}")
            _check_keys("the recipe", {path: None}, TOP_KEYS - {"stages"})
            data[path] = value
            continue
        stage_name, key = path.split(".", 1)
        stage = next((s for s in data["stages"] if stage_name in s), None)
        if stage is None:
            names = [next(iter(s)) for s in data["stages"]]
            raise UserError(f"--set {path}: the recipe has no stage {stage_name!r}"
                            f"{_nearest(stage_name, names)}")
        stage[stage_name][key] = value
    return validate(data)


def load(path: str, sets: list[str] | None = None) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"recipe {path} does not exist") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"recipe {path} is not valid YAML: {first}") from None
    return apply_sets(validate(data), sets or [])


def run(data: dict, output: str | None, overwrite: bool = False, progress: bool = True,
        trust_remote_code: bool = False) -> dict:
    """Run a validated recipe; returns the pruning metadata (with evaluations, if any).
    ``trust_remote_code`` (never from the recipe) lets transformers run the model folder's own
    modelling code."""
    out = output or data.get("output")
    if not out:
        raise UserError("no output directory: pass --output DIR or set 'output:' in the recipe")
    stages = {next(iter(s)): next(iter(s.values())) for s in data["stages"]}
    method = next(k for k in stages if k in SOLVERS)
    recipe = PruneRecipe.from_stage(method, stages[method])
    export = {**EXPORT_KEYS, **stages.get("export", {})}
    evaluation = stages.get("eval")
    if evaluation is not None:
        evaluation = {**EVAL_KEYS, **evaluation}
    with output_lock(out):  # every stage writes or records into ``out``: one run at a time
        return _run_stages(data, stages, recipe, out, overwrite, progress, export,
                           evaluation, trust_remote_code)


def _run_stages(data, stages, recipe, out, overwrite, progress, export, evaluation,
                trust_remote_code) -> dict:
    from .runs.prune import prune_checkpoint

    if "perp" in stages:
        meta = _run_with_perp(data, stages, recipe, out, overwrite, progress, export,
                              trust_remote_code)
    else:
        meta = prune_checkpoint(str(data["model"]), recipe, out, overwrite=overwrite,
                                trust_remote_code=trust_remote_code,
                                progress=progress, export=export["format"],
                                export_dtype=export["dtype"],
                                recipe_yaml=lambda ran: dump(str(data["model"]), ran,
                                                             stages.get("export"),
                                                             stages.get("eval")))
    if evaluation and (evaluation["ppl"] or evaluation["tasks"]):
        meta["evaluations"] = evaluate_output(out, evaluation, recipe.device, progress)
    return meta


def evaluate_output(out: str, ev: dict, device: str, progress: bool) -> dict:
    """The eval stage: loads the written output (so it also checks that it loads) and records
    the results into its llmprune.json."""
    from .evaluate.ppl import evaluate_loaded, record_eval
    from .loaders import load_model

    model, tokenizer, resolved = load_model(out)
    tasks = ev["tasks"]
    if tasks and not isinstance(tasks, list):
        tasks = str(tasks).split(",")
    results = {"model": out, **evaluate_loaded(
        model, tokenizer, ppl=ev["ppl"], seqlen=ev["seqlen"], max_windows=ev["max_windows"],
        batch_size=ev["batch_size"], tasks=[t.strip() for t in tasks] if tasks else None,
        limit=ev["limit"], num_fewshot=ev["num_fewshot"], include_path=ev["include_path"],
        device=device, progress=progress)}
    record_eval(resolved, results)
    return results


def _run_with_perp(data, stages, recipe, out, overwrite, progress, export,
                   trust_remote_code: bool) -> dict:
    """Solver -> PERP: prune into a hidden sibling of ``out``, retrain from it into ``out``
    (which gets the export format and the whole recipe), then remove the sibling."""
    import os
    import shutil

    from .runs.prune import prune_checkpoint
    from .io.output import check_output
    from .retrain.perp import PerpConfig
    from .runs.perp import perp_checkpoint

    final = check_output(out, overwrite)
    config = PerpConfig(**{"device": recipe.device, **stages["perp"]})
    pruned = final.parent / f".{final.name}.pruned-{os.getpid()}"
    try:
        meta = prune_checkpoint(str(data["model"]), recipe, str(pruned), overwrite=True,
                                trust_remote_code=trust_remote_code,
                                progress=progress)
        ran = PruneRecipe.from_dict(meta["recipe_resolved"])
        return perp_checkpoint(str(pruned), config, out, overwrite=overwrite, progress=progress,
                               export=export["format"], export_dtype=export["dtype"],
                               recipe_yaml=dump(str(data["model"]), ran,
                                                stages.get("export"), stages.get("eval"),
                                                stages["perp"]))
    finally:
        shutil.rmtree(pruned, ignore_errors=True)
