"""The lm-eval harness on an in-memory model.

``lm_eval.simple_evaluate`` runs with an ``HFLM`` that wraps the model object llmprune already
loaded, so pruned, compact-exported (decoded by ``llmprune.load_pretrained``) and shrunk models
are scored exactly as they are in memory. lm-eval's ``results`` dictionary is returned unchanged
(e.g. ``results["arc_easy"]["acc,none"]``). The lm-eval version is pinned in pyproject.toml.

Offline, ``include_path`` points lm-eval at task YAMLs of your own with local data files, e.g.::

    task: my_mc
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_mc.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc}, {metric: acc_norm}]
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from ..core.errors import UserError

log = logging.getLogger(__name__)


def run_tasks(model, tokenizer, tasks: list[str], *, limit: float | None = None,
              num_fewshot: int | None = None, batch_size: int = 1,
              include_path: str | None = None, device: str = "cpu", seed: int = 0) -> dict:
    """Run lm-eval ``tasks`` on ``model``; returns ``{"results", "n-shot", "versions",
    "lm_eval_version", "limit"}`` with lm-eval's own per-task dictionaries."""
    from importlib.metadata import version

    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UserError(f"the lm-eval harness is not importable ({exc}); pip install "
                        "'lm-eval==0.4.13'") from None
    if include_path is not None and not Path(include_path).exists():
        raise UserError(f"--include-path {include_path} does not exist")
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                "; for a task of your own pass --include-path DIR with its YAML"
            raise UserError(f"unknown lm-eval task {task!r}{hint}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=False, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    except (ConnectionError, OSError) as exc:
        raise UserError(f"lm-eval could not load the data of {', '.join(tasks)} ({exc}); "
                        "offline, point --include-path at task YAMLs with local data "
                        "files") from None
    if out is None:  # only on non-zero ranks of a distributed run
        return {}
    return {"results": out["results"], "n-shot": out.get("n-shot", {}),
            "versions": out.get("versions", {}), "lm_eval_version": version("lm_eval"),
            "limit": limit}


def markdown_table(lm_results: dict) -> str:
    """One row per task: acc and acc_norm (with stderr) stated explicitly."""
    lines = ["| task | n-shot | acc | acc stderr | acc_norm | acc_norm stderr |",
             "|---|---|---|---|---|---|"]
    for task, res in lm_results.get("results", {}).items():
        def fmt(key):
            v = res.get(key)
            return "-" if v is None or isinstance(v, str) else f"{v:.4f}"
        lines.append(f"| {task} | {lm_results.get('n-shot', {}).get(task, '-')} | "
                     f"{fmt('acc,none')} | {fmt('acc_stderr,none')} | {fmt('acc_norm,none')} | "
                     f"{fmt('acc_norm_stderr,none')} |")
    return "\n".join(lines)
