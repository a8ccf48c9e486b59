"""LoRAPrune: structured pruning guided by LoRA weights and gradients, during LoRA fine-tuning.

After Zhang, Chen, Zhuang, Li, Liu, Lin & Yu 2023, "LoRAPrune: Pruning Meets Low-Rank
Parameter-Efficient Fine-Tuning" (arXiv 2305.18403). Equation numbers follow the paper's method
section (numbered from our notes on the arXiv version; the full text was not at hand when this
was written, so check the numbers against the paper you read):

* Eq. (1): LoRA, ``W = W_0 + B A`` with ``A`` ``[r, in]``, ``B`` ``[out, r]`` trainable and the
  pre-trained ``W_0`` frozen (peft adds the scaling ``s = alpha / r``: ``W = W_0 + s B A``).
* Eqs. (2)-(4): the importance of a weight is the squared change of the loss when it is removed,
  to first order ``I(W_ij) = (dL/dW_ij * W_ij)^2``; a group's importance is the sum over its
  weights.
* Eqs. (5)-(7): removing ``W_ij`` from the merged weight means setting ``(BA)_ij = -W_0,ij``, so
  ``I(W_ij) ~ (dL/d(BA)_ij * ((BA)_ij + W_0,ij))^2`` -- only the gradient with respect to the
  low-rank product is needed.
* Eq. (8): that gradient is estimated from the LoRA gradients alone, from the change one SGD step
  makes to ``BA``: ``G_hat = G_B A + B G_A`` (with peft's scaling: ``s (G_B A + B G_A)``, and
  the merged weight ``W_0 + s B A``).
* Eq. (9): ``I_hat = ((W_0 + s B A) * G_hat)^2``, summed per group (Eq. 4).
* Eq. (10): a moving average over steps, ``I_bar_t = lam I_bar_{t-1} + (1 - lam) I_hat_t``.
* Iterative pruning: heads and channels are removed in several steps during fine-tuning (the
  masks stay applied in the forward), the target reached at the last step; fine-tuning then goes
  on with the final mask; the LoRA is merged at the end and the model shrunk.

The base weights never require gradients (only the LoRA matrices are trainable), so no gradient
of a base weight is ever formed. The removed groups are masked in the forward through
``structured.masked`` (pre-hooks zeroing the removed heads' / channels' inputs of the output
linears, exactly the pruned model); their LoRA rows / columns are cut away with them.

A group's weights (as in ``structured``): a query head is its q rows, its output-projection
columns and 1/group_size of its KV head's k/v rows; an MLP channel is its rows of the MLP input
linears (gate and up / fc1) and its column of the output linear (down / fc2). Biases carry no LoRA
and are not scored.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..core.errors import UserError
from ..core.flags import positive_int
from ..core.options import option
from .bonsai import Target, check_nested, forced_scores, split_target

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# the math (pure functions)


def lora_importance(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor,
                    grad_B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Eqs. (8)-(9): per-weight importance ``((W0 + s B A) * s (G_B A + B G_A))^2``.

    ``W0`` ``[out, in]``, ``A`` ``[r, in]``, ``B`` ``[out, r]``, ``grad_A`` / ``grad_B`` the loss
    gradients of ``A`` / ``B``. Returns ``[out, in]`` float32."""
    A, B = A.float(), B.float()
    g_hat = scaling * (grad_B.float() @ A + B @ grad_A.float())  # Eq. (8), [out, in]
    merged = W0.float() + scaling * (B @ A)
    return (merged * g_hat).pow(2)  # Eq. (9)


def group_importance(imp: dict[str, torch.Tensor], g, lay) -> dict[str, torch.Tensor]:
    """Eq. (4): sum per-weight importances ``imp`` (by linear name inside the layer, each
    ``[out, in]``) over each group's weights. ``g`` is the layer's ``LayerGroups``, ``lay`` the
    family's ``StructuredLayout``. Returns ``{"heads": [n_heads], "mlp": [n_channels]}``."""
    hd = g.head_dim
    index = lay.row_index(g.n_heads, g.n_kv_heads, hd, g.n_channels)

    def rows(kind: str) -> torch.Tensor:  # [rows of kind], summed per row over its linears
        return sum(imp[name][idx.to(imp[name].device)].sum(1) for name, idx in index[kind])

    mlp = rows("mlp") + imp[lay.mlp_out].sum(0)
    if g.fixed_heads:  # heads stay: their importances only fill the mask's layout
        return {"heads": torch.ones(g.n_heads, device=mlp.device), "mlp": mlp}
    heads = rows("q").reshape(g.n_heads, hd).sum(1)
    heads = heads + imp[lay.o].sum(0).reshape(g.n_heads, hd).sum(1)
    kv = (rows("k") + rows("v")).reshape(g.n_kv_heads, hd).sum(1)
    heads = heads + kv.repeat_interleave(g.group_size) / g.group_size
    return {"heads": heads, "mlp": mlp}


def prune_schedule(steps: int, prune_steps: int, prune_until: float) -> list[tuple[int, float]]:
    """(training step, fraction of the target) for every pruning event: ``prune_steps`` events
    evenly spaced over the first ``prune_until`` of training, the last one at exactly 1.0."""
    last = max(1, min(steps, round(prune_until * steps)))
    events = []
    for k in range(1, prune_steps + 1):
        at = max(1, round(k * last / prune_steps))
        events.append((at, k / prune_steps))
    events[-1] = (events[-1][0], 1.0)
    return events


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAPruneConfig:
    target: Target
    uniform: bool = True
    gqa: str = "even"
    steps: int = option(200, "LoRA optimizer steps (batches of --batch-size calibration "
                             "sequences)", positive_int)
    batch_size: int = option(1, "calibration sequences per step", positive_int)
    lr: float = option(3e-4, "AdamW learning rate of the LoRA")
    rank: int = option(8, "LoRA rank r", positive_int)
    alpha: float = option(16.0, "LoRA alpha (scaling alpha / r)")
    prune_steps: int = option(5, "pruning events; each removes an equal share of the target",
                              positive_int)
    prune_until: float = option(0.6, "fraction of the fine-tuning by which the target is "
                                     "reached (the rest recovers with the final mask)")
    ema: float = option(0.9, "moving-average factor of the importance (lambda in the paper's "
                             "Eq. 10)")
    load_8bit: bool = option(False, "8-bit base through bitsandbytes (CUDA only; an error "
                                    "elsewhere)")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1 or self.prune_steps < 1:
            raise UserError("--rank, --steps, --batch-size and --prune-steps must be >= 1")
        if self.prune_steps > self.steps:
            raise UserError(f"--prune-steps {self.prune_steps} exceeds --steps {self.steps}")
        if not 0.0 < self.prune_until <= 1.0:
            raise UserError(f"--prune-until must be in (0, 1], got {self.prune_until}")
        if not 0.0 <= self.ema < 1.0:
            raise UserError(f"--ema must be in [0, 1), got {self.ema}")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if self.gqa not in ("even", "kv"):
            raise UserError(f"--gqa must be even or kv, got {self.gqa!r}")


def check_8bit(device: str) -> None:
    """An 8-bit base needs bitsandbytes' int8 kernels, i.e. a CUDA device here."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise UserError("--load-8bit needs bitsandbytes' int8 matmul on a CUDA GPU; it is not "
                        f"supported on device {device!r} (run without --load-8bit)")
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means the same to a user
        raise UserError("--load-8bit needs the bitsandbytes package (pip install bitsandbytes)"
                        ) from None


def _target_names(lay) -> list[str]:
    """Module-name suffixes peft should wrap: every linear of the structured groups."""
    return sorted({n.rsplit(".", 1)[-1] for n in lay.linears})


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB): VmHWM where /proc has it (Linux's
    ru_maxrss carries over across exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _base_weight(module) -> torch.Tensor:
    """The frozen base weight of a peft LoRA linear, dequantized if it is 8-bit."""
    w = module.base_layer.weight
    if w.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return w.detach()
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module.base_layer).detach()


def loraprune(model, calib_ids: torch.Tensor, config: LoRAPruneConfig, *, device: str = "cpu",
              progress: bool = True):
    """Fine-tune LoRA adapters on ``calib_ids`` ``[n, seqlen]`` while pruning heads / channels
    on a schedule with the LoRA-guided criterion. Returns ``(merged_model, mask, info)``: the
    model with the LoRA merged (not yet shrunk; ``structured.save_structured`` or ``shrink_``
    does that) and the structured keep mask."""
    from peft import LoraConfig, get_peft_model

    from .shrink import full_mask, layer_groups, layout_of, masked, removed_fraction
    from .selection import check_family, select

    check_family(model, heads=config.target.heads, sparsity=config.target.sparsity,
                 uniform=config.uniform)  # also: a one-line error for families without a layout
    groups = layer_groups(model)
    adapter, lay = layout_of(model)
    torch.manual_seed(config.seed)
    model.requires_grad_(False)  # the base is frozen: never a gradient of a base weight
    peft_model = get_peft_model(model, LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none",
        target_modules=_target_names(lay)))
    inner = peft_model.base_model.model  # the same model object, its linears now wrapped
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in peft_model.parameters())
    base_grad = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert not base_grad, base_grad
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)

    wrapped = []  # per layer: {linear name: peft LoRA module}
    for layer in adapter.layers(inner):
        wrapped.append({n: layer.get_submodule(n) for n in lay.linears})
    events = dict(prune_schedule(config.steps, config.prune_steps, config.prune_until))
    mask = full_mask(inner)
    ema = None
    kw = dict(uniform=config.uniform, gqa=config.gqa)
    target = split_target(config.target, groups, config.uniform, config.gqa)
    info: dict = {"config": {k: v for k, v in asdict(config).items() if k != "target"},
                  "target": config.target.label(), "trainable_params": n_trainable,
                  "total_params": n_total, "per_kind_target": target.scaled(1.0),
                  "events": [], "losses": []}
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    peft_model.train()
    order = torch.randperm(calib_ids.shape[0], generator=gen)
    pos = 0
    bar = tqdm(range(1, config.steps + 1), desc="loraprune", unit="step", disable=not progress)
    for step in bar:
        if pos + config.batch_size > order.numel():
            order, pos = torch.randperm(calib_ids.shape[0], generator=gen), 0
        batch = calib_ids[order[pos: pos + config.batch_size]].to(device)
        pos += config.batch_size
        with masked(inner, mask):
            loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        with torch.no_grad():  # Eqs. (8)-(10) from the LoRA weights and gradients only
            scores = []
            for g, mods in zip(groups, wrapped):
                imp = {}
                for name, mod in mods.items():
                    a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                    imp[name] = lora_importance(_base_weight(mod), a, b, a.grad, b.grad,
                                                mod.scaling["default"])
                scores.append({k: v.cpu() for k, v in group_importance(imp, g, lay).items()})
            if ema is None:
                ema = scores
            else:
                ema = [{k: config.ema * e[k] + (1 - config.ema) * s[k] for k in e}
                       for e, s in zip(ema, scores)]
        opt.step()
        opt.zero_grad(set_to_none=True)
        info["losses"].append(float(loss.detach()))
        if step in events:
            new = select(forced_scores(ema, mask), groups,
                         **target.scaled(events[step]), **kw)
            check_nested(new, mask)
            mask = new
            info["events"].append({"step": step, "fraction_of_target": events[step],
                                   "removed_fraction": removed_fraction(groups, mask)})
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    info["train_seconds"] = time.perf_counter() - t0
    merged = peft_model.merge_and_unload()
    merged.eval()
    info["removed_fraction"] = removed_fraction(groups, mask)
    info["peak_rss_mib"] = peak_rss_mib()
    return merged, mask, info


