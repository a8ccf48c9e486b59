"""2:4 sparse linears for inference: :class:`SparseLinear` and :func:`apply_kernels`.

A :class:`SparseLinear` computes ``y = x @ W.T + bias`` for a 2:4 weight ``W`` with one of three
backends, picked per call from the input's device, dtype and number of rows ``M``:

``dense``
    ``F.linear`` on the dense weight: the only backend on CPU (unless forced), bit-identical to
    ``nn.Linear``.
``triton``
    the Triton kernel of :mod:`llmprune_kernels` that reads llmprune's compact 2:4 layout
    (``values`` + packed ``indices``) and expands it in registers. CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1`` (forced only: the interpreter is for tests).
``torch-semi-structured``
    PyTorch's semi-structured sparse tensors (cuSPARSELt / CUTLASS), CUDA sm80+, fp16 / bf16.

With ``backend="auto"`` a CUDA input goes to whichever backend a small dispatch table says is
fastest for its device, dtype, weight shape and ``M`` bucket. The table is measured once per
(GPU, torch and Triton versions, dtype, shape) and cached in
``$LLMPRUNE_CACHE/kernel_dispatch.json`` (default ``~/.cache/llmprune``); a sparse backend is chosen
only where it beats dense by :data:`MARGIN`, so ``auto`` is never slower than dense by more than
the measurement noise. These modules are for inference: with autograd on, ``auto`` falls back to
dense and a forced sparse backend refuses.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PatternError, UserError

log = logging.getLogger(__name__)

BACKENDS = ("dense", "triton", "torch-semi-structured")
KERNELS = ("auto", "dense", "triton", "cusparselt")  # apply_kernels(kernels=...)
BACKEND_ALIASES = {"cusparselt": "torch-semi-structured", "semi-structured": "torch-semi-structured"}
M_BUCKETS = (1, 16, 64, 256, 1024, 4096)  # rows of x at which the dispatch table is measured
MARGIN = 0.05  # a sparse backend must be this much faster than dense to be picked
DISPATCH_FILE = "kernel_dispatch.json"
DISPATCH_VERSION = 1


class KernelError(UserError):
    """A kernels / backend request that cannot be served (unknown name, no Triton, no GPU...)."""


def kernels_package():
    import llmprune_kernels

    return llmprune_kernels


def _backend_name(name: str) -> str:
    name = BACKEND_ALIASES.get(name, name)
    if name not in BACKENDS + ("auto",):
        raise KernelError(f"unknown 2:4 backend {name!r}; choose auto, dense, triton or "
                          "torch-semi-structured (cusparselt)")
    return name


# ----------------------------------------------------------------------------- compression
def compress_weight(weight: torch.Tensor, keep: torch.Tensor | None = None,
                    name: str = "the weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4 ``weight`` (pruned positions by ``keep``, default ``weight != 0``) -> llmprune's
    compact ``(values, indices)``, on the weight's device: the export's own encoder on CPU, the
    Triton kernel on CUDA when Triton is there, else the PyTorch twin."""
    from ..io import compact

    K = kernels_package()
    weight = weight.detach()
    try:
        K.reference.check_weight(weight, keep)
    except K.KernelInputError as exc:
        raise PatternError(f"{name}: {exc}") from None
    if keep is None:
        keep = weight != 0
    keep = keep.to(device=weight.device, dtype=torch.bool)
    try:
        if weight.device.type == "cpu":
            counts = keep.reshape(weight.shape[0], -1, 4).sum(-1)
            if bool((counts > 2).any()):
                raise K.NotTwoFourError(K.reference.not_two_four_message(counts > 2))
            enc = compact.encode_nm(weight.contiguous(), keep.contiguous(), 2, 4)
            return enc.parts["values"], enc.parts["indices"]
        if K.triton_usable(weight.device):
            return K.compress(weight, keep)
        return K.compress_ref(weight, keep)
    except K.NotTwoFourError as exc:
        raise PatternError(f"{name}: {exc}") from None


# ----------------------------------------------------------------------------- dispatch table
def dispatch_path() -> Path:
    from ..io.loading import cache_dir

    return cache_dir() / DISPATCH_FILE


def device_key(device: torch.device | str) -> str:
    """What a measurement depends on besides dtype and shape: the device model and the versions
    of torch and Triton."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _device_key(str(device), kernels_package().interpreting())


@functools.lru_cache(maxsize=None)
def _device_key(device: str, interp: bool) -> str:
    device = torch.device(device)
    triton_version = "none"
    if kernels_package().triton_installed():
        from importlib.metadata import version

        triton_version = version("triton")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)}|sm{major}{minor}"
    else:
        where = device.type
    return f"{where}|torch-{torch.__version__}|triton-{triton_version}" + (
        "|interpret" if interp else "")


def table_key(device, dtype: torch.dtype, shape: tuple[int, int]) -> str:
    return f"{device_key(device)}|{str(dtype).removeprefix('torch.')}|{shape[0]}x{shape[1]}"


def available_backends(device: torch.device | str, dtype: torch.dtype,
                       shape: tuple[int, int]) -> list[str]:
    """Backends that can run a ``shape`` weight of ``dtype`` on ``device``, dense first."""
    K = kernels_package()
    out = ["dense"]
    if dtype in K.reference.DTYPES and shape[1] % 4 == 0:
        if K.triton_usable(device):
            out.append("triton")
        if K.semi_structured_usable(device, dtype, shape):
            out.append("torch-semi-structured")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 20,
            warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, a wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def random_two_four(out: int, cols: int, dtype: torch.dtype, device, seed: int = 0
                    ) -> torch.Tensor:
    """A random dense 2:4 weight (2 random positions of every group of 4 kept)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(out, cols, generator=gen) / math.sqrt(cols)
    drop = torch.rand(out, cols // 4, 4, generator=gen).argsort(-1)[..., :2]
    w.view(out, cols // 4, 4).scatter_(-1, drop, 0.0)
    return w.to(device=device, dtype=dtype)


def backend_runners(weight: torch.Tensor, backends: Iterable[str]
                    ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """``x -> x @ weight.T`` for each backend, with the weight prepared once."""
    K = kernels_package()
    runners: dict[str, Callable] = {}
    for b in backends:
        if b == "dense":
            runners[b] = lambda x, w=weight: F.linear(x, w)
        elif b == "triton":
            values, indices = compress_weight(weight)
            runners[b] = lambda x, v=values, i=indices: K.matmul(x, v, i)
        elif b == "torch-semi-structured":
            semi = K.to_semi_structured(weight)
            runners[b] = lambda x, s=semi: K.semi_structured_linear(x, s, None)
        else:
            raise KernelError(f"unknown backend {b!r}")
    return runners


def measure_backends(device, dtype: torch.dtype, shape: tuple[int, int],
                     backends: Iterable[str] | None = None, buckets: Iterable[int] = M_BUCKETS,
                     reps: int = 20, warmup: int = 3) -> dict:
    """Time every backend at every ``M`` bucket on a random 2:4 weight; pick per bucket the fastest
    sparse backend that beats dense by :data:`MARGIN`, else dense."""
    device = torch.device(device)
    backends = list(backends or available_backends(device, dtype, shape))
    weight = random_two_four(*shape, dtype, device)
    runners = backend_runners(weight, backends)
    buckets = list(buckets)
    ms: dict[str, list[float]] = {b: [] for b in backends}
    for m in buckets:
        x = torch.randn(m, shape[1], device=device, dtype=dtype)
        with torch.no_grad():
            for b, run in runners.items():
                ms[b].append(time_ms(lambda: run(x), device, reps, warmup))
    return {"buckets": buckets, "ms": ms, "choice": choose(ms, len(buckets))}


def choose(ms: dict[str, list[float]], n: int) -> list[str]:
    """Per bucket: dense unless some other backend is faster than dense by :data:`MARGIN`."""
    out = []
    for i in range(n):
        best, best_ms = "dense", ms["dense"][i] * (1.0 - MARGIN)
        for b, times in ms.items():
            if b != "dense" and times[i] < best_ms:
                best, best_ms = b, times[i]
        out.append(best)
    return out


class DispatchTable:
    """Backend per (device, dtype, weight shape, M bucket), measured on first need and kept in a
    JSON file shared by every process (written atomically, merged with what is on disk)."""

    def __init__(self, path: Path | None = None,
                 measure: Callable[..., dict] = measure_backends):
        self.path = Path(path) if path is not None else dispatch_path()
        self.measure = measure
        self._entries: dict[str, dict] | None = None

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != DISPATCH_VERSION:
            return {}
        return dict(data.get("entries", {}))

    def entries(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _write(self, key: str, entry: dict) -> None:
        entries = self._read()
        entries[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".dispatch-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": DISPATCH_VERSION, "entries": entries}, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only cache costs a re-measurement next time, no more
            log.warning("cannot write the kernel dispatch table %s: %s", self.path, exc)

    def entry(self, device, dtype: torch.dtype, shape: tuple[int, int]) -> dict:
        key = table_key(device, dtype, shape)
        entries = self.entries()
        if key not in entries:
            log.info("measuring 2:4 kernels for %s %s on %s (once; cached in %s)",
                     tuple(shape), dtype, device, self.path)
            entries[key] = self.measure(device, dtype, tuple(shape))
            self._write(key, entries[key])
        return entries[key]

    def backend(self, device, dtype: torch.dtype, shape: tuple[int, int], m: int) -> str:
        return bucket_choice(self.entry(device, dtype, shape), m)


def bucket_choice(entry: dict, m: int) -> str:
    """The backend for ``m`` rows: that of the smallest measured bucket >= m (the largest
    bucket's beyond it)."""
    for bucket, choice in zip(entry["buckets"], entry["choice"]):
        if m <= bucket:
            return choice
    return entry["choice"][-1]


_TABLE: DispatchTable | None = None


def dispatch_table() -> DispatchTable:
    global _TABLE
    if _TABLE is None or _TABLE.path != dispatch_path():
        _TABLE = DispatchTable()
    return _TABLE


# ----------------------------------------------------------------------------- the module
class SparseLinear(nn.Module):
    """``y = x @ W.T + bias`` for a 2:4 weight ``W [out_features, in_features]``.

    Holds ``W`` compact (``values [out, in/2]`` and ``indices uint8 [out, ceil(in/8)]`` buffers,
    llmprune's export layout, 0.5625 x dense in 16-bit), or dense (``weight``), or both; the other
    form is derived on first need and cached per device (the cache is dropped by ``.to()``).
    ``backend``: ``auto`` (dense on CPU, the dispatch table on CUDA), ``dense``, ``triton`` or
    ``torch-semi-structured`` (alias ``cusparselt``).
    """

    def __init__(self, values: torch.Tensor | None, indices: torch.Tensor | None,
                 in_features: int, bias: torch.Tensor | None = None, backend: str = "auto",
                 weight: torch.Tensor | None = None):
        super().__init__()
        K = kernels_package()
        if values is None and weight is None:
            raise KernelError("SparseLinear needs the compact weight (values, indices) or the "
                              "dense one")
        if (values is None) != (indices is None):
            raise KernelError("SparseLinear needs both values and indices, or neither")
        if values is not None:
            try:
                K.reference.check_compact(values, indices, in_features)
            except K.KernelInputError as exc:
                raise KernelError(str(exc)) from None
            out_features = values.shape[0]
        else:
            out_features = weight.shape[0]
        if weight is not None and tuple(weight.shape) != (out_features, in_features):
            raise KernelError(f"weight is {tuple(weight.shape)}, expected "
                              f"{(out_features, in_features)}")
        self.in_features, self.out_features = in_features, out_features
        self.backend = _backend_name(backend)
        self.register_buffer("values", None if values is None else values.detach())
        self.register_buffer("indices", None if indices is None else indices.detach())
        self.register_parameter("weight", None if weight is None else nn.Parameter(
            weight.detach(), requires_grad=False))
        self.register_parameter("bias", None if bias is None else nn.Parameter(
            bias.detach(), requires_grad=False))
        self._cache: dict[tuple, object] = {}

    # -- construction
    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   keep: torch.Tensor | None = None, backend: str = "auto",
                   keep_dense: bool = False, name: str = "the weight") -> "SparseLinear":
        """From a dense 2:4 weight (pruned positions by ``keep``, default ``weight != 0``):
        compressed on the weight's device; ``keep_dense`` also keeps the dense weight."""
        values, indices = compress_weight(weight, keep, name)
        return cls(values, indices, weight.shape[1], bias, backend,
                   weight=weight if keep_dense else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep: torch.Tensor | None = None,
                    backend: str = "auto", storage: str = "compact",
                    name: str = "the weight") -> "SparseLinear":
        """From a 2:4 ``nn.Linear``. ``storage``: ``compact`` (values + indices), ``dense`` (the
        linear's own weight, shared, compressed only if a sparse backend is ever used) or
        ``both``."""
        if storage not in ("compact", "dense", "both"):
            raise KernelError(f"storage must be compact, dense or both, got {storage!r}")
        w = linear.weight.detach()
        if storage == "dense":
            check_two_four(w, keep, name)
            return cls(None, None, w.shape[1], linear.bias, backend, weight=w)
        return cls.from_dense(w, linear.bias, keep, backend, keep_dense=storage == "both",
                              name=name)

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        held = [s for s, t in (("compact", self.values), ("dense", self.weight)) if t is not None]
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend}, holds={'+'.join(held)}")

    # -- representations
    def _ref_tensor(self) -> torch.Tensor:
        return self.values if self.values is not None else self.weight

    def dense_weight(self) -> torch.Tensor:
        """The dense 2:4 weight (held, or decompressed bit for bit and cached)."""
        if self.weight is not None:
            return self.weight
        key = ("dense",)
        if key not in self._cache:
            K = kernels_package()
            if K.triton_usable(self.values.device) and self.values.device.type == "cuda":
                self._cache[key] = K.decompress(self.values, self.indices, self.in_features)
            else:
                self._cache[key] = K.decompress_ref(self.values, self.indices, self.in_features)
        return self._cache[key]

    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` (held, or compressed and cached)."""
        if self.values is not None:
            return self.values, self.indices
        key = ("compact",)
        if key not in self._cache:
            self._cache[key] = compress_weight(self.weight)
        return self._cache[key]

    def _semi(self):
        key = ("semi",)
        if key not in self._cache:
            self._cache[key] = kernels_package().to_semi_structured(self.dense_weight())
        return self._cache[key]

    # -- dispatch
    def backend_for(self, x: torch.Tensor) -> str:
        """The backend a call with input ``x`` uses."""
        K = kernels_package()
        dtype, shape = self._ref_tensor().dtype, (self.out_features, self.in_features)
        grad = torch.is_grad_enabled() and (x.requires_grad or (
            self.bias is not None and self.bias.requires_grad))
        if self.backend == "auto":
            if x.device.type != "cuda" or grad or x.dtype != dtype:
                return "dense"
            m = x.numel() // max(x.shape[-1], 1)
            key = ("table", x.device)
            if key not in self._cache:  # the table entry, looked up once per device
                self._cache[key] = dispatch_table().entry(x.device, dtype, shape)
            return bucket_choice(self._cache[key], m)
        if self.backend == "dense":
            return "dense"
        if grad:
            raise KernelError(f"the {self.backend} backend is for inference: run under "
                              "torch.no_grad(), or use backend='dense'")
        if self.backend == "triton" and not K.triton_usable(x.device):
            raise KernelError(f"the triton backend cannot run on {x.device}: it needs Triton "
                              "and a CUDA tensor (or TRITON_INTERPRET=1, set before Triton is "
                              "imported, for CPU tensors)")
        if self.backend == "torch-semi-structured" and not K.semi_structured_usable(
                x.device, dtype, shape):
            raise KernelError(f"torch semi-structured sparsity cannot run a {dtype} "
                              f"{shape} weight on {x.device}: it needs CUDA sm80+, float16 or "
                              "bfloat16 and block-aligned shapes")
        return self.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend_for(x)
        if backend == "dense":
            return F.linear(x, self.dense_weight(), self.bias)
        K = kernels_package()
        if backend == "triton":
            values, indices = self.compact()
            try:
                return K.matmul(x, values, indices, self.bias)
            except K.KernelInputError as exc:
                raise KernelError(str(exc)) from None
        return K.semi_structured_linear(x, self._semi(), self.bias)


def check_two_four(weight: torch.Tensor, keep: torch.Tensor | None, name: str) -> None:
    K = kernels_package()
    try:
        K.reference.check_weight(weight, keep)
    except K.KernelInputError as exc:
        raise PatternError(f"{name}: {exc}") from None
    mask = (weight != 0) if keep is None else keep.to(device=weight.device, dtype=torch.bool)
    counts = mask.reshape(weight.shape[0], -1, 4).sum(-1)
    if bool((counts > 2).any()):
        raise PatternError(f"{name}: {K.reference.not_two_four_message((counts > 2).cpu())}")
