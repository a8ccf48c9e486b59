"""DAREx-q: the rescaling factor of DARE chosen from data instead of 1 / (1 - p).

Deng et al. 2024, "DARE the Extreme: Revisiting Delta-Parameter Pruning For Fine-Tuned Models",
Sec. 4.1. DARE multiplies the kept deltas by ``1 / (1 - p)`` so that the *expected* pruned delta
equals the delta. The paper shows that the variance of the resulting output change grows like
``p / (1 - p)`` and blows up at extreme drop rates (p = 0.99), and proposes DAREx-q: rescale by
``1 / q`` with ``q`` tuned in ``[1 - p, 1]`` (``q = 1 - p`` is DARE, ``q = 1`` is no rescaling).
Its label-free variant tunes ``q`` so that the pruned model's outputs stay close to the fine-tuned
model's on unlabeled data; it also allows one ``q`` per layer.

We implement both, and the README and ``--help`` say which is which:

``--q-mode global`` (a small search on calibration data)
    One factor ``s = 1 / q`` for every tensor, chosen by evaluating the merged model
    ``W_base + s * (m * d)`` on the calibration windows for a grid of ``s``: 9 geometric steps
    from 1 to ``1 / (1 - p)``, then 4 more geometric steps inside the best grid cell; the ``s``
    of the lowest next-token loss wins. For a language model the next-token loss on unlabeled
    text is itself the label-free criterion.

``--q-mode per-layer`` (closed form per linear, then the global search for the rest)
    For each decoder-layer linear with calibration inputs ``X`` (captured from the *fine-tuned*
    model), the paper's output-matching objective
        min_s || X (s * (m * d))^T - X d^T ||_F^2
    is a one-dimensional least-squares problem with the closed form
        s* = <X (m*d)^T, X d^T> / ||X (m*d)^T||^2,
    accumulated batch by batch with hooks (two extra matmuls per linear, no Gram matrix stored).
    ``s*`` is clipped to the paper's range ``[1, 1 / (1 - p)]``. Tensors that are not decoder
    linears (embeddings, norms, biases) take the globally searched ``s`` (searched with the
    linears already at their own ``s*``).

``--q Q`` fixes ``q`` by hand (no calibration).

The drop masks here are the very masks the streamed DARE pass draws (same per-tensor seeded
generators), so the factors found are the ones for the deltas that are written.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..core.errors import UserError

Q_MODES = ("global", "per-layer")


def s_grid(p: float, n: int = 9) -> list[float]:
    """Geometric grid of rescale factors s = 1/q from 1 (q = 1) to 1/(1-p) (q = 1 - p, DARE)."""
    hi = 1.0 / (1.0 - p)
    return [hi ** (i / (n - 1)) for i in range(n)] if hi > 1.0 else [1.0]


def closed_form_s(num: float, den: float, p: float) -> float:
    """argmin_s ||s*A - B||^2 = <A, B> / ||A||^2, clipped to [1, 1/(1-p)] (q in [1-p, 1])."""
    if den <= 0.0 or not math.isfinite(num / den):
        return 1.0
    return float(min(max(num / den, 1.0), 1.0 / (1.0 - p)))


def _calib_loss(model, calib_ids: torch.Tensor, batch: int = 4) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, calib_ids.shape[0], batch):
            x = calib_ids[i: i + batch]
            loss = model(input_ids=x, labels=x).loss
            n = x.numel() - x.shape[0]
            total += float(loss) * n
            count += n
    return total / count


def darex_factors(model, base: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor],
                  p: float, calib_ids: torch.Tensor, mode: str = "global",
                  progress: bool = True) -> tuple[dict[str, float], dict]:
    """Per-tensor rescale factors ``s = 1/q`` for DAREx-q.

    ``model`` is the fine-tuned model (fp32, its weights are restored before returning);
    ``base[name]`` the base tensor and ``pruned[name]`` the un-rescaled kept delta ``m * d``,
    both fp32, for every floating tensor of the checkpoint (names as in the state dict).
    Returns ``({name: s}, info)``.
    """
    if mode not in Q_MODES:
        raise UserError(f"--q-mode must be one of {', '.join(Q_MODES)}, got {mode!r}")
    state = model.state_dict()
    names = [n for n in pruned if n in state]
    tuned = {n: state[n].detach().clone() for n in names}
    per_layer: dict[str, float] = {}
    if mode == "per-layer":
        per_layer = _per_layer_s(model, base, pruned, tuned, p, calib_ids, progress)

    def set_weights(s_other: float) -> None:
        with torch.no_grad():
            for n in names:
                s = per_layer.get(n, s_other)
                state[n].copy_(base[n] + s * pruned[n])

    losses: dict[float, float] = {}

    def loss_at(s: float) -> float:
        if s not in losses:
            set_weights(s)
            losses[s] = _calib_loss(model, calib_ids)
        return losses[s]

    grid = s_grid(p)
    bar = tqdm(total=len(grid) + 4, desc="DAREx-q search", disable=not progress)
    for s in grid:
        loss_at(s)
        bar.update()
    best = min(grid, key=loss_at)
    i = grid.index(best)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for k in range(1, 5):  # 4 geometric points strictly inside [lo, hi] around the best
        s = lo * (hi / lo) ** (k / 5)
        loss_at(s)
        bar.update()
    bar.close()
    s_glob = min(losses, key=losses.get)
    with torch.no_grad():
        for n in names:
            state[n].copy_(tuned[n])
    factors = {n: per_layer.get(n, s_glob) for n in names}
    info = {"mode": mode, "q_global": 1.0 / s_glob, "dare_q": 1.0 - p,
            "search": [{"q": 1.0 / s, "calib_loss": losses[s]} for s in sorted(losses)],
            "calib_shape": list(calib_ids.shape)}
    if per_layer:
        qs = torch.tensor([1.0 / s for s in per_layer.values()])
        info["per_layer_q"] = {"n": len(per_layer), "min": float(qs.min()),
                               "median": float(qs.median()), "max": float(qs.max())}
    return factors, info


def _per_layer_s(model, base, pruned, tuned, p, calib_ids, progress) -> dict[str, float]:
    """Closed-form s* for every decoder-layer linear (see the module docstring)."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    acc: dict[str, list[float]] = {}
    handles = []
    for i, layer in enumerate(adapter.layers(model)):
        for lname, lin in adapter.linears(layer).items():
            name = f"{adapter.layers_path}.{i}.{lname}.weight"
            if name not in pruned:
                continue
            a, d = pruned[name], tuned[name] - base[name]  # m * d and d, [out, in]
            acc[name] = [0.0, 0.0]

            def hook(_mod, inputs, _out, name=name, a=a, d=d):
                x = inputs[0].detach().reshape(-1, a.shape[1]).float()
                ya, yd = x @ a.T, x @ d.T
                acc[name][0] += float((ya * yd).sum(dtype=torch.float64))
                acc[name][1] += float((ya * ya).sum(dtype=torch.float64))
            handles.append(lin.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for i in tqdm(range(0, calib_ids.shape[0], 4), desc="DAREx-q per-layer",
                          disable=not progress):
                model(input_ids=calib_ids[i: i + 4])
    finally:
        for h in handles:
            h.remove()
    return {n: closed_form_s(num, den, p) for n, (num, den) in acc.items()}
