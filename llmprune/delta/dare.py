"""Delta-parameter pruning of fine-tuned models: DARE.

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", Sec. 3 (DARE, Drop And REscale): for the delta ``d = W_ft - W_base`` of every
parameter,

    m ~ Bernoulli(p)                      (1 = dropped, independently per element)
    d' = (1 - m) * d / (1 - p)            (Eq. 2: rescaling keeps the expected output)
    W' = W_base + d'

``--method magnitude`` keeps the ``1 - p`` largest ``|d|`` of each tensor instead of a random
subset (the importance-based baseline of "DARE the Extreme", Deng et al. 2024). ``--rescale``
chooses the factor: ``dare`` = 1 / (1 - p), ``none`` = 1, ``darex-q`` = 1 / q with q chosen from
calibration data (globally or per layer) or given by hand (see ``llmprune.darex``).

Both checkpoints are streamed tensor by tensor (peak RAM: about two tensors plus the output
shard). The random drop of each tensor uses a generator seeded from ``--seed`` and the tensor's
name, so it does not depend on the order of tensors or shards.

Outputs: ``--output`` the full model W' (a plain checkpoint), ``--delta-output`` the pruned delta
d' in the compact format (kept values + 1-bit mask), which
``llmprune.load_pretrained(DELTA_DIR, base=BASE)`` turns back into W' bit for bit: both paths
compute ``W' = cast(float32(W_base) + float32(d'))`` with ``d'`` already in the model's dtype.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.masks import lowest_k_mask
from ..io.sources import side_files
from ..io.meta import read_meta, write_meta

RESCALES = ("dare", "darex-q", "none")
METHODS = ("random", "magnitude")


def drop_mask(delta: torch.Tensor, p: float, method: str, generator: torch.Generator
              ) -> torch.Tensor:
    """bool keep mask shaped like ``delta``: random keeps each element with probability 1 - p;
    magnitude keeps exactly round((1 - p) * numel) elements, the largest |delta|."""
    if method == "random":
        return torch.rand(delta.shape, generator=generator) >= p
    if method == "magnitude":
        flat = delta.detach().float().abs().reshape(-1)
        n_drop = int(round(p * flat.numel()))
        return ~lowest_k_mask(flat, n_drop, dim=0).view(delta.shape)
    raise UserError(f"--method must be random or magnitude, got {method!r}")


def rescale_factor(p: float, rescale: str) -> float:
    """The fixed factors; darex-q's come from ``llmprune.darex`` (1.0 stands in here)."""
    if rescale == "dare":
        return 1.0 / (1.0 - p)  # Eq. 2
    if rescale in ("none", "darex-q"):
        return 1.0
    raise UserError(f"--rescale must be one of {', '.join(RESCALES)}, got {rescale!r}")


def prune_delta(base: torch.Tensor, tuned: torch.Tensor, p: float, method: str, rescale: str,
                generator: torch.Generator, factor: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d', keep)``: the pruned, rescaled delta in the tuned tensor's dtype, and its mask.
    ``factor`` overrides the rescale factor (DAREx-q's per-tensor ``1/q``)."""
    delta = tuned.float() - base.float()
    keep = drop_mask(delta, p, method, generator)
    s = rescale_factor(p, rescale) if factor is None else factor
    kept = (delta * s).masked_fill(~keep, 0.0)
    return kept.to(tuned.dtype), keep


def merge(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W' = cast(float32(W_base) + float32(d')): the one definition both outputs use."""
    return (base.float() + delta.float()).to(delta.dtype)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def check_pair(base_dir: Path, tuned_dir: Path):
    for d, flag in ((base_dir, "--base"), (tuned_dir, "--finetuned")):
        if not (d / "config.json").is_file():
            raise UserError(f"{flag} {d} is not a checkpoint directory (no config.json)")
    try:
        cb = json.loads((base_dir / "config.json").read_text())
        ct = json.loads((tuned_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config.json of --base or --finetuned: {exc}") from None
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if cb.get(key) != ct.get(key):
            raise UserError(f"--base and --finetuned differ in {key} ({cb.get(key)} vs "
                            f"{ct.get(key)}): they are not the same architecture")
    from ..io.safetensors import SafetensorsFiles, checkpoint_files

    rb = SafetensorsFiles(checkpoint_files(base_dir))
    rt = SafetensorsFiles(checkpoint_files(tuned_dir))
    for name in rt.entries:
        if name not in rb.entries:
            raise UserError(f"tensor {name} of --finetuned is missing from --base")
        if rb.shape(name) != rt.shape(name):
            raise UserError(f"tensor {name} has shape {rt.shape(name)} in --finetuned but "
                            f"{rb.shape(name)} in --base")
    return rb, rt


def _darex(base_dir: Path, tuned_dir: Path, rb, rt, drop: float, method: str, seed: int,
           q: float | None, q_mode: str, calib_data: str | None, nsamples: int, seqlen: int,
           progress: bool) -> tuple[dict[str, float] | float, dict]:
    """DAREx-q's factors: ``1/q`` for a given ``q``, else searched on calibration windows."""
    from .darex import Q_MODES, darex_factors

    if q is not None:
        if not (1.0 - drop <= q <= 1.0):
            raise UserError(f"--q must be in [1 - drop, 1] = [{1 - drop:g}, 1] (q = 1 - drop is "
                            f"plain DARE, q = 1 no rescaling), got {q}")
        return 1.0 / q, {"mode": "given", "q_global": q}
    if q_mode not in Q_MODES:
        raise UserError(f"--q-mode must be one of {', '.join(Q_MODES)}, got {q_mode!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..io.data import load_text, tokenize, windows

    tok = AutoTokenizer.from_pretrained(tuned_dir)
    text = load_text(calib_data, "calib")
    ids = windows(tokenize(tok, text.text), nsamples, seqlen, source=text.source)
    model = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).eval()
    base_t, pruned = {}, {}
    for name in rt.entries:
        t, b = rt.read(name), rb.read(name)
        if t.is_floating_point():
            base_t[name] = b.float()
            d = t.float() - base_t[name]
            pruned[name] = d.masked_fill_(~drop_mask(d, drop, method,
                                                     tensor_generator(seed, name)), 0.0)
    factors, info = darex_factors(model, base_t, pruned, drop, ids, q_mode, progress)
    info["calib"] = text.source
    return factors, info


def dare(base: str, finetuned: str, drop: float, method: str = "random", rescale: str = "dare",
         seed: int = 0, output: str | None = None, delta_output: str | None = None,
         overwrite: bool = False, progress: bool = True, q: float | None = None,
         q_mode: str = "global", calib_data: str | None = None, nsamples: int = 16,
         seqlen: int = 256) -> dict:
    """Prune the delta of ``finetuned`` against ``base``; write W' and/or the compact delta.

    ``rescale="darex-q"`` uses ``q`` when given, else searches it on ``nsamples`` x ``seqlen``
    windows of ``calib_data`` (which should be text of the fine-tuning domain) in ``q_mode``
    ``global`` or ``per-layer``; see ``llmprune.darex``."""
    from ..io.export import export
    from ..io.sources import Source
    from ..io.meta import nm_of
    from ..io.loading import resolve
    from ..io.output import atomic_dir, check_output

    if not (0.0 <= drop < 1.0):
        raise UserError(f"--drop must be in [0, 1), got {drop}")
    rescale_factor(drop, rescale)
    if method not in METHODS:
        raise UserError(f"--method must be random or magnitude, got {method!r}")
    if not output and not delta_output:
        raise UserError("give --output (the merged model) and/or --delta-output (the delta)")
    outs = [check_output(o, overwrite) for o in (output, delta_output) if o]
    base_dir, tuned_dir = Path(resolve(base)), Path(resolve(finetuned))
    for o in outs:
        check_output(str(o), overwrite, sources=(str(base_dir), str(tuned_dir)))
    rb, rt = check_pair(base_dir, tuned_dir)
    config = json.loads((tuned_dir / "config.json").read_text())
    copy = side_files(tuned_dir)
    meta = {"method": "dare", "drop": drop, "selection": method, "rescale": rescale,
            "seed": seed, "base": base, "finetuned": finetuned}
    factors: dict[str, float] | float | None = None
    if rescale == "darex-q":
        factors, meta["darex_q"] = _darex(base_dir, tuned_dir, rb, rt, drop, method, seed, q,
                                          q_mode, calib_data, nsamples, seqlen, progress)
    kept = total = 0

    def factor(name: str) -> float | None:
        if isinstance(factors, dict):
            return factors.get(name)
        return factors

    def deltas() -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """(name, d' or the tuned tensor when not floating, keep mask or None, base tensor)"""
        nonlocal kept, total
        for name in rt.entries:
            t, b = rt.read(name), rb.read(name)
            if not t.is_floating_point():
                yield name, t, None, b
                continue
            d, keep = prune_delta(b, t, drop, method, rescale, tensor_generator(seed, name),
                                  factor(name))
            kept += int(keep.sum())
            total += keep.numel()
            yield name, d, keep, b

    results = {}
    if delta_output:
        masks: dict[str, torch.Tensor] = {}

        def delta_tensors():
            for name, d, keep, _ in deltas():
                if keep is not None:
                    masks[name] = keep
                yield name, d
        with atomic_dir(outs[-1], overwrite) as tmp:
            src = Source(delta_tensors(), config, masks, {"target": "unstructured",
                                                          "dare": meta}, copy, None)
            results["delta"] = export(src, tmp, "compact", progress=progress)
            info = read_meta(tmp)
            info["delta_of"] = {"base": base, **meta}
            write_meta(tmp, info)
    if output:
        def merged():
            for name, d, keep, b in deltas():
                yield name, (merge(b, d) if keep is not None else d)
        with atomic_dir(outs[0], overwrite) as tmp:
            src = Source(merged(), config, None, {"dare": meta}, copy, nm_of(None))
            results["model"] = export(src, tmp, "dense", progress=progress)
    meta["kept_fraction"] = kept / max(total, 1)
    return {**meta, **results}


def load_delta(src: Path, base: str | None, verify: bool, trust_remote_code: bool):
    """A compact DARE delta: W' = cast(float32(W_base) + float32(d')) for every tensor, the same
    expression ``llmprune dare --output`` wrote, so the result is bit for bit that model."""
    from transformers import AutoModelForCausalLM

    from ..core.errors import CorruptCheckpointError
    from ..io.compact_reader import iter_compact
    from ..io.meta import read_meta
    from ..io.loading import resolve

    if base is None:
        info = read_meta(src)["delta_of"]
        raise UserError(f"{src} is a delta against {info.get('base')}; pass "
                        "load_pretrained(DIR, base=BASE)")
    model = AutoModelForCausalLM.from_pretrained(resolve(base), dtype="auto",
                                                 trust_remote_code=trust_remote_code)
    params = model.state_dict()
    with torch.no_grad():
        for name, delta, _ in iter_compact(src, verify=verify):
            if name not in params or tuple(params[name].shape) != tuple(delta.shape):
                raise CorruptCheckpointError(f"{src}: delta tensor {name} does not fit {base}")
            if delta.is_floating_point():
                params[name].copy_(merge(params[name], delta))
            else:
                params[name].copy_(delta)
    return model.eval()
