"""PERP: retrain a tiny subset of a pruned model's parameters, keeping its sparsity exactly.

Zimmer, Andoni, Spiegel, Pokutta 2023, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of
LLMs" (arXiv:2312.15230). After pruning, updating only a small, expressive set of parameters --
the normalisation layers' weights, the biases, low-rank adapters -- recovers most of what full
retraining would. A plain LoRA update ``W + s B A`` is dense and, once merged, would fill the
pruned zeros in; the paper's two variants merge without touching the sparsity (Sec. 3, the
MaskLoRA and ScaleLoRA reparametrisations of a pruned weight ``W`` with keep mask ``M``):

    MaskLoRA:   W' = W + (s B A) ⊙ M        B [out, r] = 0, A [r, in] random at init (W' = W)
    ScaleLoRA:  W' = (B A) ⊙ W              initialised so that B A = 1 (W' = W)

``s = alpha / r`` is LoRA's scaling (Hu et al. 2022); ScaleLoRA does not use it (a multiplicative
factor has no natural scale to correct). For rank 1, ScaleLoRA is ``diag(b) W diag(a)``: a scale
per output row and per input column. Its zeros stay zero by construction; MaskLoRA's because the
delta is multiplied by ``M``. Both formulas are used *in the forward during training* (so the
model trained is the model merged) and at merge.

How peft is used. peft (>= 0.17) has two extension points: ``LoraVariant`` (the hook DoRA uses:
``init``, ``merge_safe``/``merge_unsafe``, ``unmerge``, ``forward``) and
``LoraConfig._register_custom_module`` (the documented "custom models" route that makes
``get_peft_model`` build a given LoRA layer class for a given base-layer type). We register a
subclass of peft's own ``lora.Linear`` for ``nn.Linear`` that resolves its variant to MaskLoRA or
ScaleLoRA, so ``get_peft_model`` / ``merge_and_unload`` do everything else as usual (adapter
creation, freezing the base, the merge loop with its NaN check, unloading the wrappers). The
subclass also overrides ``forward`` to run one matmul with the reparametrised weight: peft's
default path computes ``base(x)`` first and then adds the variant's output, which for a masked
delta (not low rank any more) would cost a second full matmul. Only the pruned decoder linears
(the ones with a keep mask) are wrapped; the keep mask sits on the base linear as a
non-persistent buffer while training and is removed afterwards.

After the merge every pruned linear's mask -- as its weights show it, ``keep | (W != 0)`` -- is
compared with the one before training, bit for bit; a difference (a nonzero where the pruning
mask says pruned) raises :class:`SparsityViolation` and nothing is written.

Mixtures of experts. transformers 5 stores most families' experts as 3D parameters
``[experts, out, in]`` (gpt-oss: ``[experts, in, out]``); the pruning run names their masks one
expert at a time, ``<experts module>.expert_linears.<param>.<e>``
(:mod:`llmprune.models.experts`). PERP maps each such mask to its expert's slice of the fused
parameter (:func:`llmprune.models.experts.expert_weight`). By default the experts stay **frozen**:
no adapter, and none of the experts module's own parameters (its weights, and gpt-oss's
per-expert biases) is trained, so their pruned zeros stay zero trivially. With ``experts`` in
``train`` each pruned fused parameter gets one MaskLoRA / ScaleLoRA adapter per expert
(:mod:`llmprune.retrain.perp_experts`). The merge check covers the experts like the linears. Everything else is trained as in a dense model: adapters on every other pruned
linear (attention, dense and shared-expert MLPs), the norms, and with ``biases`` every parameter
named ``bias``. Routers are not pruned, so PERP leaves them as it leaves every unpruned linear:
the weight as it is, its bias (gpt-oss's router has one) trained under ``biases``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.errors import UserError
from ..core.flags import positive_int
from ..core.options import option
from ..models.experts import expert_of
from .perp_experts import adapters_active, add_expert_adapters, merge_expert_adapters
from .perp_masks import (SparsityViolation, bool_masks, check_masks_kept, pruned_weight,
                         weight_masks)

log = logging.getLogger(__name__)

TRAIN_CHOICES = ("norms", "biases", "lora", "experts")
VARIANTS = ("masklora", "scalelora")
_KEEP = "llmprune_perp_keep"  # name of the keep-mask buffer on a base linear while training


@dataclass(frozen=True)
class PerpConfig:
    """One PERP run. Defaults: norms + MaskLoRA rank 8 on every pruned linear, 200 AdamW steps.

    MaskLoRA is the default variant: its update is plain LoRA's, masked, so LoRA's usual ranks,
    alphas and learning rates carry over, and it starts from zero like LoRA.
    """

    train: tuple[str, ...] = option(
        ("norms", "lora"), "comma list of what is trained: norms (LayerNorm/RMSNorm weights), "
                           "biases (every bias), lora (adapters on the pruned linears), experts "
                           "(adapters on each pruned expert of a mixture of experts' fused "
                           "parameters, one per expert; holds a second copy of the experts' "
                           "weights while training; without it the experts stay frozen); "
                           "routers get no adapter",
        parse=str)  # the comma list, split by __post_init__
    lora_variant: str = option(
        "masklora", "masklora: W + (alpha/rank B A) * M, the LoRA delta masked (starts at 0, "
                    "LoRA's usual rank/alpha/lr carry over); scalelora: (B A) * W, initialised "
                    "to B A = 1 (rank 1 = scaling rows and columns)", choices=VARIANTS)
    rank: int = option(8, "LoRA rank", positive_int)
    alpha: float = option(16.0, "LoRA alpha; MaskLoRA's delta is scaled by alpha/rank "
                                "(ScaleLoRA ignores it)")
    steps: int = option(200, "optimizer steps (AdamW)", positive_int)
    lr: float = option(3e-4, "peak learning rate (linear warm-up over 10% of the steps, then "
                             "linear decay to 0)")
    warmup: float = 0.1  # fraction of the steps with a linear warm-up; then linear decay to 0
    weight_decay: float = 0.0
    batch_size: int = option(4, "sequences per step", positive_int)
    seqlen: int = option(512, "tokens per training sequence", positive_int)
    nsamples: int = option(128, "training windows cut from --calib-data (cycled through in "
                                "seeded random order)", positive_int)
    calib_data: str | None = option(None, "training text: a .txt/.jsonl file or "
                                          "wikitext2|c4|ptb (default: wikitext2 valid.txt, the "
                                          "calibration text)")
    calib_sampling: str = option("consecutive", "consecutive: the first nsamples "
                                                "non-overlapping windows; random: seeded random "
                                                "windows", choices=("consecutive", "random"))
    seed: int = option(0, "seed (adapter init, batch order)")
    device: str = option("cpu", "compute device: cpu or cuda[:N]")
    dtype: str = option(
        "auto", "compute dtype of training; auto = bf16 autocast (fp32 master weights) on a "
                "CUDA device with bf16 for an fp32 model, else the model's (on CPU, bf16 "
                "autocast training measured 5-20x slower than fp32)",
        choices=("auto", "fp32", "bf16"))
    gradient_checkpointing: str = option(
        "auto", "recompute activations in the backward to save memory; auto = on for "
                "accelerators (memory-bound), off on CPU (RAM is plenty; it would only add "
                "~30% compute)", choices=("auto", "on", "off"))

    def __post_init__(self):
        train = self.train
        if isinstance(train, str):
            train = tuple(t.strip() for t in train.split(",") if t.strip())
        object.__setattr__(self, "train", tuple(train))
        bad = [t for t in self.train if t not in TRAIN_CHOICES]
        if bad or not self.train:
            raise UserError(f"--train takes a comma list of {', '.join(TRAIN_CHOICES)}, got "
                            f"{','.join(self.train) or 'nothing'!r}")
        if len(set(self.train)) != len(self.train):
            raise UserError(f"--train names a choice twice: {','.join(self.train)!r}")
        if self.lora_variant not in VARIANTS:
            raise UserError(f"--lora-variant must be masklora or scalelora, got "
                            f"{self.lora_variant!r}")
        for name in ("rank", "steps", "batch_size", "nsamples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got "
                                f"{getattr(self, name)!r}")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise UserError(f"--seqlen must be an integer >= 2, got {self.seqlen!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise UserError(f"--alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise UserError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise UserError(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise UserError(f"--gradient-checkpointing must be auto, on or off, got "
                            f"{self.gradient_checkpointing!r}")
        if self.calib_sampling not in ("consecutive", "random"):
            raise UserError(f"calib_sampling must be consecutive or random, got "
                            f"{self.calib_sampling!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = ",".join(self.train)
        return d

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class PerpReport:
    trainable_params: int
    total_params: int
    trainable_by_kind: dict
    losses: list
    seconds: float
    compute_dtype: str
    gradient_checkpointing: bool
    sparsity_checked: int  # pruned linears (MoE experts one by one) whose mask was compared

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trainable_fraction"] = self.trainable_fraction
        n = max(1, min(10, len(self.losses) // 10))
        d["loss_first"] = sum(self.losses[:n]) / n if self.losses else None
        d["loss_last"] = sum(self.losses[-n:]) / n if self.losses else None
        return d


# ----------------------------------------------------------------------------- the two variants
def _lora_variant_base():
    from peft.tuners.lora.layer import LoraVariant

    return LoraVariant


def masklora_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float, keep: torch.Tensor) -> torch.Tensor:
    """MaskLoRA (PERP Sec. 3): ``W + (s B A) ⊙ M``; ``W [out, in]``, ``A [r, in]``,
    ``B [out, r]``,
    ``M`` bool ``[out, in]``."""
    delta = (lora_b @ lora_a) * scaling  # [out, in]
    return weight + delta * keep.to(delta.dtype)


def scalelora_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
                     ) -> torch.Tensor:
    """ScaleLoRA (PERP Sec. 3): ``(B A) ⊙ W``. ``+ 0.0`` turns the ``-0.0`` that a negative
    factor makes of a pruned ``+0.0`` back into ``+0.0`` (same value, canonical bits), so that
    compact exports decode the merged weights bit for bit."""
    return weight * (lora_b @ lora_a) + 0.0


class _PerpVariant:
    """Shared by MaskLoRA and ScaleLoRA: ``weight`` is the single formula used by the training
    forward and by the merge."""

    @staticmethod
    def weight(module, adapter: str, base_weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def supports_lora_conversion(self) -> bool:
        return False

    @classmethod
    def merge_safe(cls, module, active_adapter, orig_weight):
        return cls.weight(module, active_adapter, orig_weight).to(orig_weight.dtype)

    @classmethod
    def merge_unsafe(cls, module, active_adapter, orig_weight):
        orig_weight.data = cls.weight(module, active_adapter, orig_weight.data
                                      ).to(orig_weight.dtype)

    @classmethod
    def forward(cls, module, active_adapter, x, result, **kwargs):
        # Only reached through peft's generic paths (our layer's forward does one matmul):
        # the result so far plus the difference the reparametrisation makes.
        base = module.get_base_layer().weight
        diff = cls.weight(module, active_adapter, base) - base
        return result + F.linear(x, diff.to(x.dtype))


def _make_variants():
    LoraVariant = _lora_variant_base()

    class MaskLoraVariant(_PerpVariant, LoraVariant):
        @staticmethod
        def init(module, adapter_name, **kwargs):
            base = module.get_base_layer()
            if not hasattr(base, _KEEP):
                raise AssertionError("MaskLoRA needs the keep mask on the base linear")

        @staticmethod
        def weight(module, adapter, base_weight):
            a = module.lora_A[adapter].weight
            b = module.lora_B[adapter].weight
            keep = getattr(module.get_base_layer(), _KEEP)
            return masklora_weight(base_weight.to(a.dtype), a, b, module.scaling[adapter], keep)

        @staticmethod
        def unmerge(module, active_adapter, orig_weight):
            a = module.lora_A[active_adapter].weight
            b = module.lora_B[active_adapter].weight
            keep = getattr(module.get_base_layer(), _KEEP)
            delta = (b @ a) * module.scaling[active_adapter] * keep.to(a.dtype)
            return (orig_weight.data - delta).to(orig_weight.dtype)

    class ScaleLoraVariant(_PerpVariant, LoraVariant):
        @staticmethod
        def init(module, adapter_name, **kwargs):
            # B A = 1 at init: B = 1/r everywhere, A = 1 + N where the r rows of N sum to zero
            # in every column, so sum_k B[i,k] A[k,j] = (1/r) (r + 0) = 1. N breaks the symmetry
            # between the r components (with N = 0 they would get identical gradients forever);
            # for r = 1 N is 0 and this is diag(b) W diag(a) with b = a = 1.
            a = module.lora_A[adapter_name].weight
            b = module.lora_B[adapter_name].weight
            r = a.shape[0]
            with torch.no_grad():
                noise = torch.randn(a.shape, dtype=torch.float32) * 0.02
                noise -= noise.mean(dim=0, keepdim=True)
                a.copy_((1.0 + noise).to(a.dtype))
                b.fill_(1.0 / r)

        @staticmethod
        def weight(module, adapter, base_weight):
            a = module.lora_A[adapter].weight
            b = module.lora_B[adapter].weight
            return scalelora_weight(base_weight.to(a.dtype), a, b)

        @staticmethod
        def unmerge(module, active_adapter, orig_weight):
            a = module.lora_A[active_adapter].weight
            b = module.lora_B[active_adapter].weight
            scale = b @ a
            return torch.where(scale != 0, orig_weight.data / scale, orig_weight.data
                               ).to(orig_weight.dtype)

    return MaskLoraVariant, ScaleLoraVariant


def _perp_linear_class(variant: str):
    """A subclass of peft's ``lora.Linear`` whose variant is MaskLoRA or ScaleLoRA."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    mask_cls, scale_cls = _make_variants()
    chosen = mask_cls if variant == "masklora" else scale_cls

    class PerpLoraLinear(LoraLinear):
        def resolve_lora_variant(self, *, config, **kwargs):
            return chosen()

        def forward(self, x, *args, **kwargs):
            adapters = [a for a in self.active_adapters if a in self.lora_A]
            if self.disable_adapters or self.merged or len(adapters) != 1 or \
                    kwargs.get("adapter_names") is not None:
                return super().forward(x, *args, **kwargs)
            base = self.get_base_layer()
            weight = chosen.weight(self, adapters[0], base.weight)
            # one matmul with the reparametrised weight (autocast casts it, like base(x) would)
            return F.linear(x, weight, base.bias)

    PerpLoraLinear.__name__ = PerpLoraLinear.__qualname__ = f"PerpLoraLinear_{variant}"
    return PerpLoraLinear


# ----------------------------------------------------------------------------- helpers
def _unique_params(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


def select_norms_and_biases(model: nn.Module, train: tuple[str, ...],
                            frozen: frozenset[str] = frozenset()) -> dict[str, list]:
    """The non-LoRA parameters PERP trains: ``norms`` -- the weight of every LayerNorm/RMSNorm;
    ``biases`` -- every parameter named ``bias`` (linears' and norms'), except the own
    parameters of the modules named in ``frozen`` (the experts modules). Returns kind ->
    params."""
    chosen: dict[str, list] = {"norms": [], "biases": []}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        if "lora_" in mod_name or mod_name in frozen:
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            if "biases" in train and p_name == "bias":
                chosen["biases"].append(p)
                seen.add(id(p))
            elif "norms" in train and p_name == "weight" and _is_norm(module):
                chosen["norms"].append(p)
                seen.add(id(p))
    return chosen


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def _compute_dtype(config: PerpConfig, model) -> torch.dtype | None:
    """bf16 autocast on a CUDA device that supports it, for an fp32 model; None = the model's
    own dtype. Not on CPU: measured on smollm2-135m (2-core EPYC with avx512_bf16, torch 2.13),
    a training step under CPU bf16 autocast took 5x (forward) to 20x (backward) longer than in
    fp32, although bf16 inference GEMMs alone are faster there."""
    if config.dtype == "fp32":
        return None
    if config.dtype == "bf16":
        return torch.bfloat16
    if (config.device.startswith("cuda") and torch.cuda.is_available()
            and torch.cuda.is_bf16_supported()
            and next(model.parameters()).dtype == torch.float32):
        return torch.bfloat16
    return None


def _use_checkpointing(config: PerpConfig) -> bool:
    # On an accelerator, memory bounds the batch and checkpointing buys it back for ~30% more
    # compute; on a CPU the host RAM holds the activations of small batches easily and the
    # recomputation would only cost time.
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing == "on"
    return not config.device.startswith("cpu")


class PeftHolder(nn.Module):
    """What peft wraps: the model as its one child ``model``, with no ``config`` of its own, so
    that peft takes PERP's target names as they are. Given a transformers model of a MoE family
    whose v4 checkpoints transformers converts (mixtral, qwen3_moe, olmoe, deepseek_v3, ...),
    peft rewrites v4-era targets (peft 0.21, ``convert_peft_config_for_transformers``): a name
    ending in ``gate_proj``/``up_proj``/``down_proj`` is replaced by the fused experts'
    ``gate_up_proj``/``down_proj`` parameters, which would move the adapters of a dense MLP or a
    shared expert onto the frozen experts."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


# ----------------------------------------------------------------------------- the API
@dataclass
class Prepared:
    """A model ready for PERP training: ``net`` is what runs (the peft model when LoRA is
    trained, else the model), ``params`` what the optimizer updates."""

    net: nn.Module
    model: nn.Module
    peft_model: nn.Module | None
    params: list
    trainable_by_kind: dict
    total_params: int
    keep: dict  # module name -> bool [out, in], linears and experts
    zeros_before: dict  # weight_masks() before training


def prepare(model, masks: dict[str, torch.Tensor], config: PerpConfig) -> Prepared:
    """Freeze everything, wrap the pruned linears with MaskLoRA/ScaleLoRA adapters (if ``lora``
    is trained), add the expert adapters (if ``experts`` is trained; else the experts stay frozen,
    see the module docstring) and unfreeze the chosen norms/biases. ``model`` is modified in place."""
    keep = bool_masks(model, masks)
    modules = dict(model.named_modules())
    linears = sorted(n for n in keep if isinstance(modules.get(n), nn.Linear))
    experts_modules = frozenset(found[0] for found in map(expert_of, keep) if found)
    for name, mask in keep.items():  # the input must be pruned as its masks say
        w = pruned_weight(model, modules, name).detach()
        if bool((w.cpu()[~mask] != 0).any()):
            raise UserError(f"{name} has nonzero weights where its pruning mask says pruned: the "
                            "checkpoint was changed after pruning; re-prune it")
    torch.manual_seed(config.seed)
    before = weight_masks(model, keep)
    total = _unique_params(model)
    for p in model.parameters():
        p.requires_grad_(False)

    peft_model = None
    by_kind: dict[str, int] = {}
    if "lora" in config.train and linears:
        from peft import LoraConfig, get_peft_model

        for name in linears:
            modules[name].register_buffer(_KEEP, keep[name].to(modules[name].weight.device),
                                          persistent=False)
        lcfg = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none",
                          target_modules=[f"model.{n}" for n in linears])
        # peft's documented custom-module hook: every targeted nn.Linear becomes our subclass of
        # peft's lora.Linear (MaskLoRA / ScaleLoRA as its LoraVariant), see the module docstring
        lcfg._register_custom_module({nn.Linear: _perp_linear_class(config.lora_variant)})
        peft_model = get_peft_model(PeftHolder(model), lcfg)
        by_kind["lora"] = sum(p.numel() for n, p in peft_model.named_parameters()
                              if "lora_" in n and p.requires_grad)
        model = peft_model.get_base_model().model  # the same modules, wrapped in place
    if "experts" in config.train:
        adapters = add_expert_adapters(model, keep, config.rank, config.alpha,
                                       config.lora_variant)
        by_kind["experts"] = sum(p.numel() for p in adapters)
    extra = select_norms_and_biases(model, config.train, experts_modules)
    for kind, chosen in extra.items():
        if kind in config.train:
            for p in chosen:
                p.requires_grad_(True)
            by_kind[kind] = sum(p.numel() for p in chosen)
    net = peft_model if peft_model is not None else model
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"--train {','.join(config.train)} selects no parameters in this model "
                        "(e.g. it has no biases); choose another --train")
    return Prepared(net, model, peft_model, params, by_kind, total, keep, before)


def train(prep: Prepared, config: PerpConfig, train_ids: torch.Tensor, progress: bool = True
          ) -> tuple[list[float], float, torch.dtype | None, bool]:
    """AdamW on the causal-LM loss of ``train_ids`` windows, in seeded random order (a new
    permutation every epoch), linear warm-up then linear decay. Returns (losses, seconds,
    autocast dtype, gradient checkpointing)."""
    dtype = _compute_dtype(config, prep.model)
    ckpt = _use_checkpointing(config)
    net = prep.net
    net.to(config.device)
    if ckpt:
        prep.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    opt = torch.optim.AdamW(prep.params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup * config.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.steps, warmup))
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    device_type = torch.device(config.device).type
    t0 = time.perf_counter()
    bar = tqdm(range(config.steps), desc="perp", unit="step", disable=not progress)
    for _ in bar:
        while order.numel() < config.batch_size:  # a fresh seeded epoch order
            order = torch.cat([order, torch.randperm(train_ids.shape[0], generator=gen)])
        idx, order = order[: config.batch_size], order[config.batch_size:]
        batch = train_ids[idx].to(config.device)
        with adapters_active(prep.model):  # expert adapters: one weight per forward
            with torch.autocast(device_type=device_type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                loss = net(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise UserError(f"the training loss became {loss.item()}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    if ckpt:
        prep.model.gradient_checkpointing_disable()
    net.eval()
    return losses, seconds, dtype, ckpt


def merge(prep: Prepared) -> tuple[nn.Module, int]:
    """Merge the adapters (through peft, with our variants' formula; the expert adapters by
    writing their weight in place), drop the keep buffers,
    freeze, and check every pruned linear's mask (:func:`weight_masks`) against the one before.
    Returns (plain model, number of linears checked)."""
    model = prep.model
    if prep.peft_model is not None:
        model = prep.peft_model.merge_and_unload(safe_merge=True).model
        modules = dict(model.named_modules())
        for name in prep.keep:
            if name in modules:  # a linear (an expert has no module of its own)
                modules[name]._buffers.pop(_KEEP, None)
    merge_expert_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to("cpu")
    return model, check_masks_kept(prep.zeros_before, weight_masks(model, prep.keep))


def perp(model, masks: dict[str, torch.Tensor], config: PerpConfig = PerpConfig(),
         train_ids: torch.Tensor | None = None, tokenizer=None, progress: bool = True):
    """Retrain ``model`` (pruned, in place) as PERP and merge; returns ``(model, PerpReport)``.

    ``masks``: keep masks of the pruned linears (module name or ``<module>.weight`` -> bool
    ``[out, in]`` or packed uint8, e.g. ``llmprune.prune(..., keep_masks=True).masks``); those of
    MoE experts, ``<experts module>.expert_linears.<param>.<e>``, are trained only with
    ``experts`` in ``config.train``.
    ``train_ids`` ``[n, seqlen]`` are the training windows; when None they are cut from
    ``config.calib_data`` with ``tokenizer``. The returned model is the merged plain model.
    """
    from ..core.device import check_device

    check_device(config.device)
    if train_ids is None:
        if tokenizer is None:
            raise UserError("PERP needs training text: pass train_ids or a tokenizer")
        train_ids = training_ids(tokenizer, config)[0]
    if train_ids.dim() != 2 or train_ids.shape[1] < 2:
        raise UserError(f"train_ids must be [n, seqlen >= 2], got {tuple(train_ids.shape)}")
    prep = prepare(model, masks, config)
    n_trainable = sum(p.numel() for p in prep.params)
    log.info("PERP trains %d of %d parameters (%.4f%%)", n_trainable, prep.total_params,
             100 * n_trainable / prep.total_params)
    losses, seconds, dtype, ckpt = train(prep, config, train_ids, progress)
    model, checked = merge(prep)
    report = PerpReport(n_trainable, prep.total_params, prep.trainable_by_kind, losses, seconds,
                        str(dtype or next(model.parameters()).dtype).removeprefix("torch."),
                        ckpt, checked)
    return model, report


def training_ids(tokenizer, config: PerpConfig) -> tuple[torch.Tensor, dict]:
    """Training windows ``[nsamples, seqlen]`` from ``config.calib_data`` (default: WikiText-2
    valid.txt, the calibration text), and their description."""
    from ..io.data import calibration_ids

    return calibration_ids(tokenizer, config)


__all__ = ["PerpConfig", "PerpReport", "SparsityViolation", "check_masks_kept", "masklora_weight",
           "perp", "pruned_weight", "scalelora_weight", "select_norms_and_biases",
           "training_ids", "weight_masks"]
