"""``llmprune push``: upload an output directory to the Hugging Face Hub with a model card.

The upload is one ``create_repo`` and one commit (``HfApi.create_commit``) holding every file of
the directory plus a generated ``README.md`` (the model card); the local directory is only read,
never modified. The token comes from ``HF_TOKEN`` or the login cache, as everywhere in
huggingface_hub, and is never printed or written anywhere. ``HF_ENDPOINT`` selects another Hub.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CorruptCheckpointError, UserError, redact
from .meta import COMPACT_FORMAT, read_meta

# Hub ids and licenses of the built-in models, for the card's base_model / license.
BUILTIN_BASES = {
    "smollm2-135m": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
}
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(UserError):
    pass


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    local: Path | None  # None: generated (the model card)
    size: int


def _meta(directory: Path) -> dict:
    try:
        return read_meta(directory) or {}
    except CorruptCheckpointError:
        return {}


def _front_matter_license(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    match = re.match(r"^---\n(.*?)\n---", text, re.S)
    if not match:
        return None
    lic = re.search(r"^license:\s*(\S+)\s*$", match.group(1), re.M)
    return lic.group(1) if lic else None


def _base_info(meta: dict) -> dict:
    src_meta = meta.get("source_meta") or meta
    source = src_meta.get("source_model") or ""
    info = dict(BUILTIN_BASES.get(source, {}))
    resolved = src_meta.get("resolved_model") or ""
    if not info and source and _REPO_ID_RE.match(source) and not Path(source).exists():
        info["base_model"] = source
    if "license" not in info and resolved and Path(resolved).is_dir():
        lic = _front_matter_license(Path(resolved) / "README.md")
        if lic:
            info["license"] = lic
    return info


def _per_kind_sparsity(meta: dict) -> dict[str, float]:
    layers = (meta.get("source_meta") or meta).get("layers") or {}
    acc: dict[str, list[float]] = {}
    for name, info in layers.items():
        kind = name.rsplit(".", 1)[-1]
        numel = info["shape"][0] * info["shape"][1]
        acc.setdefault(kind, [0.0, 0.0])
        acc[kind][0] += info["sparsity"] * numel
        acc[kind][1] += numel
    return {k: v[0] / v[1] for k, v in acc.items() if v[1]}


def _sizes(directory: Path, meta: dict) -> tuple[int, int | None]:
    on_disk = sum(p.stat().st_size for p in directory.glob("*.safetensors")
                  if p.name != "llmprune_masks.safetensors")
    dense = (meta.get("totals") or {}).get("dense_tensor_bytes")
    return on_disk, dense


def model_card(directory: Path, repo_id: str, license: str | None = None) -> str:
    meta = _meta(directory)
    src_meta = meta.get("source_meta") or meta
    recipe = meta.get("recipe") or src_meta.get("recipe") or {}
    method = recipe.get("method", "unknown")
    target = src_meta.get("target") or ""
    base = _base_info(meta)
    lic = license or base.get("license")
    compact = meta.get("format") == COMPACT_FORMAT
    tags = ["pruned", "llmprune", method]
    if target:
        tags.append(f"{target.replace(':', 'of')}-sparsity" if ":" in target else
                    "unstructured-sparsity")
    front = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags]
    if base.get("base_model"):
        front.append(f"base_model: {base['base_model']}")
    if lic:
        front.append(f"license: {lic}")
    front.append("---")

    lines = front + ["", f"# {repo_id.split('/')[-1]}", ""]
    what = f"{base.get('base_model') or src_meta.get('source_model') or 'a model'}"
    lines += [f"{what} pruned with **{method}**"
              + (f" to **{target}** sparsity" if target else "")
              + " by [llmprune](https://github.com/llmprune/llmprune).", ""]
    sparsity = src_meta.get("sparsity")
    if sparsity is not None:
        lines.append(f"Sparsity over the pruned linears: {sparsity:.4f}.")
    kinds = _per_kind_sparsity(meta)
    if kinds:
        lines += ["", "| linear | sparsity |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(kinds.items())]
    on_disk, dense = _sizes(directory, meta)
    lines += ["", f"Weights on disk: {on_disk / 2**20:.1f} MiB"
              + (f" against {dense / 2**20:.1f} MiB dense ({on_disk / dense:.3f}x)."
                 if dense else " (a dense checkpoint, zeros in place).")]
    if recipe:
        lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2), "```"]
    evals = meta.get("evaluations") or src_meta.get("evaluations") or {}
    if src_meta.get("eval"):
        e = src_meta["eval"]
        lines += ["", "## Evaluation", "", "| data | dense perplexity | pruned perplexity |",
                  "|---|---|---|",
                  f"| {e.get('data')} ({e.get('max_windows')} x {e.get('seqlen')}) | "
                  f"{e.get('dense_perplexity', float('nan')):.4f} | "
                  f"{e.get('pruned_perplexity', float('nan')):.4f} |"]
    if evals:
        lines += ["", "| evaluation | metric | value |", "|---|---|---|"]
        for key, val in sorted(evals.items()):
            if key.startswith("perplexity/"):
                lines.append(f"| {key} | perplexity | {val['value']:.4f} |")
            else:
                for metric in ("acc,none", "acc_norm,none"):
                    if metric in val.get("results", {}):
                        lines.append(f"| {key} | {metric.split(',')[0]} | "
                                     f"{val['results'][metric]:.4f} |")
    lines += ["", "## How to load", "", "```python"]
    if compact:
        lines += ["import llmprune  # pip install llmprune", "",
                  f'model = llmprune.load_pretrained("{repo_id}")  # after snapshot_download',
                  "```", "",
                  "This is a compact export (kept values plus bitmask / N:M indices); plain "
                  "`AutoModelForCausalLM.from_pretrained` refuses it and names "
                  "`llmprune.load_pretrained`."]
    else:
        lines += ["from transformers import AutoModelForCausalLM", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```"]
    return "\n".join(lines) + "\n"


def regular_files(directory: Path) -> list[Path]:
    """The regular files inside ``directory``, sorted: symbolic links (to files or folders,
    inside or outside it) are skipped, never followed, as are hidden entries."""
    out = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not os.path.islink(os.path.join(root, d))]
        for name in names:
            path = Path(root) / name
            if not name.startswith(".") and stat.S_ISREG(path.lstat().st_mode):
                out.append(path)
    return sorted(out)


def plan(directory: Path, card: str) -> list[UploadFile]:
    files = [UploadFile(p.relative_to(directory).as_posix(), p, p.lstat().st_size)
             for p in regular_files(directory)
             if p.relative_to(directory).as_posix() != "README.md"]
    return files + [UploadFile("README.md", None, len(card.encode()))]


def push(directory: str, repo_id: str, private: bool = False, dry_run: bool = False,
         license: str | None = None, commit_message: str | None = None) -> list[UploadFile]:
    """Upload ``directory`` to ``repo_id`` (or, with ``dry_run``, only say what would go)."""
    src = Path(directory).expanduser()
    if not (src / "config.json").is_file():
        raise UserError(f"{directory} is not a model directory (no config.json)")
    if not _REPO_ID_RE.match(repo_id):
        raise UserError(f"--repo-id must look like user/name, got {repo_id!r}")
    card = model_card(src, repo_id, license)
    files = plan(src, card)
    if dry_run:
        return files

    from huggingface_hub import CommitOperationAdd, HfApi

    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint)
    where = redact(endpoint) if endpoint else "the Hugging Face Hub"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        ops = [CommitOperationAdd(f.path_in_repo, str(f.local)) for f in files if f.local]
        ops.append(CommitOperationAdd("README.md", card.encode()))
        api.create_commit(repo_id, operations=ops, repo_type="model",
                          commit_message=commit_message or "Upload pruned model (llmprune)")
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line for the user
        raise HubError(redact(_explain(exc, repo_id, where))) from None
    return files


def _explain(exc: Exception, repo_id: str, where: str) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return (f"the Hub refused the push to {repo_id} ({status}): log in with `hf auth login` "
                "or set HF_TOKEN to a token with write access")
    if status is not None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"pushing to {repo_id} failed ({status}): {first}"
    return (f"cannot reach {where} to push {repo_id} ({type(exc).__name__}); check the network "
            "or HF_ENDPOINT; nothing was changed locally")
