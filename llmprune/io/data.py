"""Calibration and evaluation text.

Sources, in the order ``--calib-data`` / ``--ppl`` are interpreted:

1. a local ``.txt`` file (read as one text) or ``.jsonl`` file (the ``"text"`` field of each line);
2. a data set name: ``wikitext2`` reads the local WikiText-2 files (see below) and falls back to the
   Hugging Face ``wikitext`` data set; ``c4`` and ``ptb`` need the Hub;
3. nothing: ``wikitext2``.

Local WikiText-2 is searched in this order (the first directory holding ``valid.txt`` and
``test.txt`` wins): ``$LLMPRUNE_WIKITEXT2_DIR``, ``$LLMPRUNE_DATA_DIR/wikitext-2``,
``./shared/data/wikitext-2``, ``../shared/data/wikitext-2``, and ``shared/data/wikitext-2`` beside
the folder this package was checked out into. These files are never shipped with llmprune.

Calibration follows the benchmark protocol: the text is tokenized once as a whole, cut into
consecutive non-overlapping windows of ``seqlen`` tokens starting at token 0, and the first
``nsamples`` windows are used. ``sampling="random"`` instead draws ``nsamples`` random windows with
a seeded generator (the SparseGPT/Wanda papers' scheme).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import DataError

DATASET_NAMES = ("wikitext2", "c4", "ptb")


def wikitext2_search_path() -> list[Path]:
    paths = []
    if os.environ.get("LLMPRUNE_WIKITEXT2_DIR"):
        paths.append(Path(os.environ["LLMPRUNE_WIKITEXT2_DIR"]))
    if os.environ.get("LLMPRUNE_DATA_DIR"):
        paths.append(Path(os.environ["LLMPRUNE_DATA_DIR"]) / "wikitext-2")
    paths += [Path("shared/data/wikitext-2"), Path("../shared/data/wikitext-2")]
    paths.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2")
    return paths


def find_wikitext2() -> Path | None:
    for path in wikitext2_search_path():
        if (path / "valid.txt").is_file() and (path / "test.txt").is_file():
            return path
    return None


@dataclass(frozen=True)
class Text:
    text: str
    source: str  # a path or a data set name, for reports
    sha256: str  # of the raw bytes that were read


def _from_file(path: Path) -> Text:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".jsonl":
        parts = []
        for lineno, line in enumerate(decoded.splitlines(), 1):
            if not line.strip():
                continue
            try:
                parts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{path}:{lineno} is not a JSON object with a \"text\" field"
                ) from None
        decoded = "\n\n".join(parts)
    return Text(decoded, str(path), hashlib.sha256(raw).hexdigest())


def _from_hub(name: str, split: str) -> Text:
    try:
        import datasets

        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            text = "\n\n".join(ds["text"])
        elif name == "ptb":
            ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)
            text = "\n\n".join(ds["sentence"])
        else:  # c4: one shard, as the SparseGPT paper does
            shard = ("en/c4-train.00000-of-01024.json.gz" if split == "train"
                     else "en/c4-validation.00000-of-00008.json.gz")
            ds = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
            text = "\n\n".join(ds["text"][:5000])
    except Exception as exc:  # noqa: BLE001 - any network/cache failure means the same to a user
        raise DataError(
            f"cannot load data set {name!r} from the Hugging Face Hub ({type(exc).__name__}); "
            "pass a local .txt or .jsonl file instead"
        ) from None
    return Text(text, f"hf:{name}/{split}", hashlib.sha256(text.encode()).hexdigest())


def load_text(source: str | None, split: str) -> Text:
    """Load text for ``split`` (``"calib"`` or ``"eval"``) from a path or data set name."""
    name = source or "wikitext2"
    if name in DATASET_NAMES:
        if name == "wikitext2":
            local = find_wikitext2()
            if local is not None:
                return _from_file(local / ("valid.txt" if split == "calib" else "test.txt"))
        hub_split = {"calib": "validation" if name == "wikitext2" else "train", "eval": "test"}[split]
        if name == "c4" and split == "eval":
            hub_split = "validation"
        return _from_hub(name, hub_split)
    path = Path(name).expanduser()
    if path.is_file():
        return _from_file(path)
    raise DataError(
        f"data {name!r} is neither a file nor one of {', '.join(DATASET_NAMES)}; "
        "pass a local .txt/.jsonl path"
    )


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once. Returns int64 ids, shape ``[n_tokens]``."""
    # The whole text is far longer than model_max_length; that warning is expected and harmless.
    old = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e30)
    try:
        ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    finally:
        if old is not None:
            tokenizer.model_max_length = old
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, nsamples: int, seqlen: int, sampling: str = "consecutive",
            seed: int = 0, source: str = "text") -> torch.Tensor:
    """Cut ``nsamples`` windows of ``seqlen`` tokens. Returns ``[nsamples, seqlen]`` int64."""
    if nsamples <= 0 or seqlen <= 1:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    need = nsamples * seqlen
    if sampling == "consecutive":
        if ids.numel() < need:
            raise DataError(
                f"calibration text {source} has {ids.numel()} tokens, fewer than nsamples x seqlen "
                f"= {nsamples} x {seqlen} = {need}; lower --nsamples/--seqlen or give more text"
            )
        return ids[:need].view(nsamples, seqlen).clone()
    if sampling == "random":
        if ids.numel() < seqlen + 1:
            raise DataError(f"calibration text {source} has {ids.numel()} tokens, fewer than "
                            f"--seqlen {seqlen}; lower --seqlen or give more text")
        if ids.numel() < need:
            raise DataError(
                f"calibration text {source} has {ids.numel()} tokens, fewer than nsamples x seqlen "
                f"= {need}; lower --nsamples/--seqlen or give more text"
            )
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
        return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
    raise DataError(f"unknown sampling {sampling!r}; use consecutive or random")


def ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def text_windows(tokenizer, text: Text, nsamples: int, seqlen: int,
                 sampling: str = "consecutive", seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Token ids ``[nsamples, seqlen]`` cut from ``text`` (:func:`windows`), and a description
    for reports: the text's source and hash, the ids' hash and shape."""
    ids = windows(tokenize(tokenizer, text.text), nsamples, seqlen, sampling, seed, text.source)
    return ids, {"source": text.source, "text_sha256": text.sha256, "ids_sha256": ids_sha256(ids),
                 "shape": list(ids.shape)}


def calibration_ids(tokenizer, recipe) -> tuple[torch.Tensor, dict]:
    """Token ids ``[nsamples, seqlen]`` for a recipe (anything with ``calib_data``, ``nsamples``,
    ``seqlen``, ``calib_sampling`` and ``seed``), and a description for reports."""
    return text_windows(tokenizer, load_text(recipe.calib_data, "calib"), recipe.nsamples,
                        recipe.seqlen, recipe.calib_sampling, recipe.seed)
