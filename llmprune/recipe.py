"""A pruning run, as one frozen, validated dataclass. The CLI builds one from its flags and writes
it into every output's ``llmprune.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import yaml

from .core.errors import UserError
from .core.sparsity import Sparsity
from .models.experts import MOE_CALIBRATE
from .solvers import SOLVERS, options_of

CALIB_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16,
                "fp16": torch.float16}


@dataclass(frozen=True)
class PruneRecipe:
    method: str
    sparsity: float | None = None
    pattern: str | None = None  # "N:M" or None for unstructured
    nsamples: int = 128
    seqlen: int = 2048
    calib_data: str | None = None  # path or data set name; None = wikitext2
    calib_sampling: str = "consecutive"
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 4
    true_sequential: bool = True  # q/k/v, then o, then gate/up, then down (calibrate.py)
    calib_dtype: str = "auto"  # dtype of calibration forward passes; statistics are float32
    blocksize: int = 128  # sparsegpt
    percdamp: float = 0.01  # sparsegpt
    allocation: str = "uniform"  # uniform | owl (per-layer sparsity from outlier ratios)
    owl_lambda: float = 0.08  # OWL: layer sparsities stay within target +- lambda
    owl_m: float = 5.0  # OWL: an outlier scores above M x the layer's mean Wanda score
    # MoE: an expert's statistics from the tokens routed to it, or from every calibration token
    moe_calibrate: str = "routed"
    # options of the solver that are not fields above (a registered solver's own options)
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = type_problem(f.name, f.type, getattr(self, f.name))
            if problem:
                raise UserError(f"{problem}; fix it in the recipe (or the flag --"
                                f"{f.name.replace('_', '-')})")
        if self.method not in SOLVERS:
            raise UserError(f"unknown method {self.method!r}; choose one of "
                            f"{', '.join(sorted(SOLVERS))}")
        SOLVERS[self.method](**self.solver_options())  # the solver validates its options
        self.target  # validates sparsity and pattern
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise UserError("--nsamples and --batch-size must be >= 1 and --seqlen >= 2")
        if self.calib_dtype not in CALIB_DTYPES:
            raise UserError(f"--calib-dtype must be one of {', '.join(CALIB_DTYPES)}")
        if self.calib_sampling not in ("consecutive", "random"):
            raise UserError("--calib-sampling must be consecutive or random")
        if self.allocation not in ("uniform", "owl"):
            raise UserError(f"--allocation must be uniform or owl, got {self.allocation!r}")
        if self.allocation == "owl":
            if self.target.kind != "unstructured":
                raise UserError("--allocation owl sets a different unstructured sparsity per "
                                "layer; it does not combine with an N:M --pattern")
            if not (0 <= self.owl_lambda < 1) or self.owl_m <= 0:
                raise UserError("--owl-lambda must be in [0, 1) and --owl-m > 0")
        if self.moe_calibrate not in MOE_CALIBRATE:
            raise UserError(f"--moe-calibrate must be {' or '.join(MOE_CALIBRATE)}, got "
                            f"{self.moe_calibrate!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise UserError(f"--device must be cpu or cuda[:N], got {self.device!r}")

    @property
    def target(self) -> Sparsity:
        return Sparsity.parse(self.sparsity, self.pattern)

    @property
    def torch_calib_dtype(self) -> torch.dtype | None:
        return CALIB_DTYPES[self.calib_dtype]

    def solver_options(self) -> dict:
        """Keyword arguments of the solver: its options that are recipe fields (sparsegpt's
        ``blocksize``, ``percdamp``) taken from those fields, the rest from ``options``."""
        names = [f.name for f in options_of(SOLVERS[self.method])]
        unknown = sorted(set(self.options) - (set(names) - RECIPE_FIELDS))
        if unknown:
            raise UserError(f"unknown {self.method} options {unknown}; valid: "
                            f"{sorted(set(names) - RECIPE_FIELDS) or 'none'}")
        return {n: getattr(self, n) if n in RECIPE_FIELDS else self.options[n] for n in names
                if n in RECIPE_FIELDS or n in self.options}

    def to_dict(self) -> dict:
        data = asdict(self)
        if not data["options"]:
            del data["options"]  # a run of a built-in solver records exactly its fields
        if data["moe_calibrate"] == "routed":
            # the default is left out, so that recipes of runs that do not ask for "all" read
            # as before (and in llmprune versions without the field)
            del data["moe_calibrate"]
        return data

    @classmethod
    def keys(cls, method: str) -> set[str]:
        """Keys a recipe stage of solver ``method`` accepts: the fields and the solver's options."""
        return (RECIPE_FIELDS - {"method", "options"}) | {f.name for f in options_of(SOLVERS[method])}

    @classmethod
    def from_stage(cls, method: str, args: dict) -> "PruneRecipe":
        """The recipe of a solver stage ``{method: args}``: keys that are fields set fields,
        the solver's other options go to ``options``."""
        if method not in SOLVERS:
            raise UserError(f"unknown method {method!r}; choose one of {', '.join(sorted(SOLVERS))}")
        unknown = sorted(set(args) - cls.keys(method))
        if unknown:
            raise UserError(f"unknown {method} keys {unknown}; valid keys: {sorted(cls.keys(method))}")
        own = {k: v for k, v in args.items() if k in RECIPE_FIELDS}
        extra = {k: v for k, v in args.items() if k not in RECIPE_FIELDS}
        return cls(method=method, **own, options=extra)

    @classmethod
    def from_dict(cls, data: dict) -> "PruneRecipe":
        data = dict(data)
        method = data.pop("method", None)
        options = data.pop("options", {})
        return cls.from_stage(method, {**data, **options})


# the Python types a field's annotation names (an int is a valid float; a bool is only a bool)
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,)}


def type_problem(name: str, annotation: str, value) -> str | None:
    """What is wrong with ``value`` for a field annotated ``annotation`` (``"float | None"``),
    or None when it fits; names the annotation does not know are not checked."""
    allowed = [a.strip() for a in str(annotation).split("|")]
    if value is None:
        return None if "None" in allowed else f"{name} must be set, got nothing"
    known = [a for a in allowed if a in _TYPES]
    if len(known) < len([a for a in allowed if a != "None"]):
        return None
    for a in known:
        if isinstance(value, _TYPES[a]) and (a == "bool" or not isinstance(value, bool)):
            return None
    return f"{name} must be {' or '.join(allowed)}, got {value!r}"


RECIPE_FIELDS = frozenset(f.name for f in fields(PruneRecipe))


def dump(model: str, recipe: PruneRecipe, export: dict | None = None,
         evaluation: dict | None = None, perp: dict | None = None) -> str:
    """The recipe.yaml that reproduces a run (every solver field spelled out)."""
    solver = {k: v for k, v in recipe.to_dict().items() if k not in ("method", "options")}
    solver.update(recipe.options)
    stages = [{recipe.method: solver}]
    if perp is not None:
        stages.append({"perp": perp})
    if export:
        stages.append({"export": export})
    if evaluation:
        stages.append({"eval": evaluation})
    head = "# written by llmprune: `llmprune run recipe.yaml --output DIR` reproduces this run\n"
    return head + yaml.safe_dump({"model": model, "stages": stages}, sort_keys=False)
