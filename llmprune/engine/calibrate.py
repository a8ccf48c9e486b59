"""The layer-by-layer calibration engine.

1. Catch the inputs of the first decoder layer (hidden states and every keyword argument the layer
   needs: attention mask, position ids, rotary position embeddings, ...) by running the model's
   own forward with a stand-in for the layer list. ``use_cache=False`` matters: with a cache the
   captured kwargs would hold a KV-cache object and every later batch would also attend to the
   keys of the batches before it, silently corrupting the statistics.
2. For each decoder layer in turn (only that layer on the compute device):
   a. forward hooks accumulate per-input-group statistics in float32 while the calibration
      batches run through the layer;
   b. the solver prunes each group;
   c. the layer runs again so that the *pruned* outputs feed the next layer.

With ``true_sequential`` the groups of a layer (q/k/v, then o, then gate/up, then down) are
calibrated and pruned one after another, so each group sees the outputs of the already pruned
groups before it. That order needs only ONE forward pass per layer (:class:`_Lockstep`): every
calibration batch runs the layer in its own greenlet, the batches take turns in batch order, and
each waits at the first linear of every group until all batches have added their statistics
there; then the group is pruned and the pass goes on with the pruned weights. The pass's
output is already the pruned layer's output, so there is no separate propagation pass. The
statistics are added in the same (batch) order as by the multi-pass schedule, so both give
bit-identical results (tested); the price is that every batch's live activations are held at
once (``EngineOptions.fused=False`` keeps the multi-pass schedule).
"""

from __future__ import annotations

import copy
import ctypes
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.bits import count_true, pack_bits, unpack_bits
from ..core.sparsity import Sparsity, check_divisible
from ..models import Adapter
from ..models.experts import ExpertLinear
from ..solvers import data_free_solver
from ..solvers.base import Solver

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early (the rest of it is not needed)."""


@dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    pruned: int

    @property
    def sparsity(self) -> float:
        return self.pruned / (self.shape[0] * self.shape[1])


@dataclass
class Report:
    layers: list[LinearReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # module name -> the keep mask packed 1 bit per weight (compact.pack_bits: uint8
    # [out, ceil(in/8)], bit set = kept); 1/8 of a bool mask, so a 7B model's masks take 0.8 GB
    masks: dict[str, torch.Tensor] | None = None
    calib_dtype: str | None = None  # dtype the calibration forward passes ran in
    allocation: dict | None = None  # per-layer sparsity allocation (OWL), when not uniform
    # linears no calibration token reached (experts the router never chose), pruned by magnitude
    uncalibrated: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.pruned for r in self.layers) / max(total, 1)

    def keep_mask(self, name: str) -> torch.Tensor:
        """bool ``[out, in]``, True where linear ``name`` kept its weight (needs
        ``keep_masks``)."""
        shape = next(r.shape for r in self.layers if r.name == name)
        return unpack_bits(self.masks[name], shape[1])

    def pruned_mask(self, name: str) -> torch.Tensor:
        """bool ``[out, in]``, True where linear ``name`` was pruned: ``~keep_mask(name)``."""
        return ~self.keep_mask(name)

    def add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"
    batch_size: int = 4
    true_sequential: bool = False
    calib_dtype: torch.dtype | None = None  # dtype of the forward passes; None = the model's
    keep_masks: bool = False
    progress: bool = True
    # Hooks for many devices (llmprune.distributed), None = one process on one device:
    # collect_stats replaces collect_layer_stats (same signature), e.g. to calibrate on this
    # process's share of the batches and combine the statistics of all processes before each solve;
    # placement puts a layer on its device(s) (.place(layer)) and back (.release(layer)).
    collect_stats: Callable | None = None
    placement: object | None = None
    # true_sequential in one lock-step forward pass per layer (see the module docstring):
    # None = when the activations it holds fit ``fuse_budget`` bytes (default: a quarter of
    # the memory available on the compute device), True = always, False = never, i.e. one
    # calibration pass per group plus a propagation pass. Both give bit-identical results.
    fused: bool | None = None
    fuse_budget: int | None = None


class _Catcher(nn.Module):
    def __init__(self):
        super().__init__()
        self.captured: list[tuple[torch.Tensor, dict]] = []

    def forward(self, hidden_states, *args, **kwargs):
        assert not args, "decoder layers are expected to take keyword arguments only"
        self.captured.append((hidden_states, kwargs))
        raise _StopForward


def _cast_floats(obj, dtype: torch.dtype | None):
    if dtype is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def _parent_and_attr(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: Adapter, ids: torch.Tensor, opts: EngineOptions):
    """Run the embeddings for every batch and return the first layer's ``[(hidden, kwargs)]``."""
    parent, attr = _parent_and_attr(model, adapter.layers_path)
    layers = getattr(parent, attr)
    catcher = _Catcher()
    setattr(parent, attr, nn.ModuleList([catcher]))
    device = torch.device(opts.device)
    try:
        model.to(device)  # the layer list is swapped out, so only embeddings/norms move
        for batch in ids.split(opts.batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        if device.type != "cpu":
            model.to("cpu")
        setattr(parent, attr, layers)
    return [(_cast_floats(h, opts.calib_dtype), _cast_floats(kw, opts.calib_dtype))
            for h, kw in catcher.captured]


def layer_groups(adapter: Adapter, layer: nn.Module, inputs: list) -> tuple[tuple[str, ...], ...]:
    """The input groups of ``layer``: declared by its adapter, or watched while the layer runs
    its first calibration batch (:meth:`Adapter.groups_of`)."""
    hidden, kwargs = inputs[0]
    return adapter.groups_of(layer, lambda: layer(hidden, **kwargs))


def run_layer(layer: nn.Module, inputs: list) -> None:
    """Replace every batch's hidden state by the layer's output, in place, one batch at a time,
    so that inputs and outputs of all batches are never held at once."""
    for b, (hidden, kwargs) in enumerate(inputs):
        out = layer(hidden, **kwargs)
        inputs[b] = (out[0] if isinstance(out, tuple) else out, kwargs)
        del hidden, out


def _release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Every layer allocates and frees the same activation-sized buffers (9-25 MB for smollm2 at
    batch 8); glibc keeps them on a fragmenting heap, so resident memory creeps up layer after
    layer. Trimming once per layer stops the creep at no measurable cost, where forcing such
    buffers onto mmap (``M_MMAP_THRESHOLD``) also fixed the creep but made pruning 30% slower.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        pass


def check_target(model: nn.Module, adapter: Adapter, target) -> None:
    """Fail early, before any calibration work, if N:M cannot tile some prunable layer."""
    for i, layer in enumerate(adapter.layers(model)):
        for name, lin in adapter.linears(layer).items():
            check_divisible(f"{adapter.layers_path}.{i}.{name}", lin.in_features,
                            layer_target(target, i))


@torch.no_grad()
def prune_without_data(model: nn.Module, adapter: Adapter, solver: Solver, target: Sparsity,
                       opts: EngineOptions) -> Report:
    """Solvers that need no calibration (magnitude) prune each linear directly: no forward pass."""
    report = Report(masks={} if opts.keep_masks else None)
    t0 = time.perf_counter()
    layers = adapter.layers(model)
    for i, layer in enumerate(tqdm(layers, desc=f"{solver.name}", unit="layer",
                                   disable=not opts.progress)):
        for group in adapter.groups_of(layer):
            solve_linear_group(layer, None, adapter, i, group, solver, None, target, report)
    report.add_time("solve", time.perf_counter() - t0)
    return report


def layer_target(target: "Sparsity | list[Sparsity]", index: int) -> Sparsity:
    """The target of decoder layer ``index``: one for all layers, or one per layer (OWL)."""
    return target[index] if isinstance(target, (list, tuple)) else target


def solve_linear_group(layer, fwd_layer, adapter, index, group, solver, stats, target, report):
    target = layer_target(target, index)
    lins = [layer.get_submodule(n) for n in group]
    if stats is not None and getattr(stats, "tokens", None) == 0:
        # no calibration token reached this group (an expert never routed to): statistics of
        # zeros would make SparseGPT drop every weight, so it is pruned by magnitude instead
        solver, stats = data_free_solver(), None
        report.uncalibrated += [f"{adapter.layers_path}.{index}.{n}" for n in group]
    solved = solver.solve_group([lin.weight.detach() for lin in lins], stats, target,
                                list(group))
    for name, lin, res in zip(group, lins, solved):
        # copy_ into the loaded (usually memory-mapped) weight: rebinding ``.data`` instead saves
        # the copy-on-write faults (1.5 s of Wanda on smollm2-135m) but keeps the mapped pages
        # resident beside the new ones (measured: peak RSS 1050 -> 1450-1700 MiB)
        if res.weight.data_ptr() != lin.weight.data_ptr():  # else pruned in place
            lin.weight.copy_(res.weight)  # rounds to the weight's dtype, without a temporary
        if fwd_layer is not None and fwd_layer is not layer:
            fwd_layer.get_submodule(name).weight.copy_(res.weight)
        full = f"{adapter.layers_path}.{index}.{name}"
        if res.mask is not None:
            # count_true, not mask.sum(): torch sums a bool tensor through an int64 copy of it
            mask = res.mask.cpu()  # True = kept
            pruned = mask.numel() - count_true(mask)
            keep = pack_bits(mask) if report.masks is not None else None
            del mask
        else:
            keep = res.keep_bits.cpu()
            pruned = lin.weight.numel() - count_true(keep)
        report.layers.append(LinearReport(full, tuple(lin.weight.shape), pruned))
        if report.masks is not None:
            report.masks[full] = keep
        del res  # before the next result is computed (a solver may yield them one by one)


def collect_layer_stats(layer: nn.Module, groups: list[tuple[str, ...]], inputs: list,
                        solver: Solver, device: torch.device) -> list:
    """Run the calibration batches through ``layer`` and return one statistics object per input
    group. A forward pre-hook on each group's first linear feeds it; once every group of a batch
    has been seen the rest of that batch's forward pass is skipped."""
    stats, hooks, seen = [], [], set()
    for gi, group in enumerate(groups):
        lin = layer.get_submodule(group[0])
        # on the linear's own device: ``device`` unless a placement spread the layer out
        stats.append(solver.new_stats(lin.in_features, lin.weight.device))

        def hook(_mod, args, _st=stats[-1], _gi=gi):
            _st.add(args[0])
            seen.add(_gi)
            if len(seen) == len(groups):
                raise _StopForward
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        for hidden, kwargs in inputs:
            seen.clear()
            try:
                layer(hidden, **kwargs)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return stats


def lockstep_bytes(layer: nn.Module, groups, inputs: list) -> int:
    """Estimate of the activations the lock-step pass holds at once: every calibration token's
    state inside the layer at a group's first linear. Measured on smollm2-135m (fp32, 16384
    tokens): 178 MB; this counts 4 hidden-wide tensors and the widest group input per token
    (251 MB), e.g. at o_proj: the normed input, q, k, v and the attention output."""
    hidden = layer.get_submodule(groups[0][0]).in_features
    widest = max(layer.get_submodule(g[0]).in_features for g in groups)
    first = inputs[0][0]
    tokens = sum(h.numel() for h, _ in inputs) // first.shape[-1]
    return tokens * (4 * hidden + widest) * first.element_size()


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CPU: MemAvailable; CUDA: free device memory); None if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu" and sys.platform.startswith("linux"):
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def sequential_phases(layer: nn.Module, groups) -> list[list[tuple[str, ...]]]:
    """The true-sequential schedule: one calibration pass per group, in forward order, except
    for MoE experts: the groups of one fused expert parameter (one per expert, each reached by
    its own tokens only) share one pass, at the place of the first of them, so a layer of E
    experts costs a pass per expert parameter, not per expert."""
    phases: list[list[tuple[str, ...]]] = []
    by_param: dict[tuple, list] = {}
    for group in groups:
        lin = layer.get_submodule(group[0])
        if isinstance(lin, ExpertLinear):
            key = (id(lin.owner), lin.param)
            if key not in by_param:
                by_param[key] = []
                phases.append(by_param[key])
            by_param[key].append(group)
        else:
            phases.append([group])
    return phases


def _use_lockstep(layer: nn.Module, groups, inputs: list, opts: EngineOptions,
                  device: torch.device) -> bool:
    if not opts.true_sequential or opts.collect_stats is not None or opts.fused is False:
        return False
    if opts.fused:
        return True
    need = lockstep_bytes(layer, groups, inputs)
    budget = opts.fuse_budget
    if budget is None:
        free = available_bytes(device)
        # a quarter: the solve (a Hessian and its factorisation) needs room beside them
        budget = free // 4 if free is not None else need
    if need > budget:
        log.info("true-sequential: %.0f MiB of activations exceed the %.0f MiB budget, so each "
                 "group gets its own calibration pass (same result, slower)",
                 need / 2**20, budget / 2**20)
    return need <= budget


class _Lockstep:
    """One forward pass of ``layer`` per calibration batch, all batches in lock-step, meeting at
    the first linear of every input group.

    Each batch's forward pass runs in its own greenlet (a coroutine with its own C stack, all on
    the calling thread), so it can pause in the middle of the layer. Forward pre-hooks on every
    linear of a group (its members read the same input, whichever is called first) add the
    batch's input to the group's statistics and switch back to the scheduler, which resumes the
    batches in order 0, 1, ..., n-1. Once every live batch waits at group g, the scheduler calls
    ``solve(g, stats)``, which prunes the group's weights in place, and the next round resumes
    them, so each linear runs with the pruned weights. Each group's statistics are summed in
    batch order, exactly as a separate calibration pass would (bit-identical results).

    Greenlets rather than threads: with one OS thread per batch every switch went to another
    OpenMP team and malloc arena (measured on smollm2-135m: 35% slower forward passes, and the
    arenas' free memory added up)."""

    def __init__(self, layer: nn.Module, groups: list[tuple[str, ...]], solver: Solver,
                 solve: Callable[[int, object], None]):
        self.layer, self.groups, self.solver, self.solve = layer, groups, solver, solve
        self.stats: list = []
        self.arrived = [0] * len(groups)
        self.solved = [False] * len(groups)
        self.scheduler = None
        self.inputs_of = [layer.get_submodule(group[0]) for group in groups]  # one per group
        self.widest = max(range(len(groups)), key=lambda g: (self.inputs_of[g].in_features, g))

    def _hook(self, g: int, _mod, args) -> None:
        if self.solved[g]:
            return
        if self.stats[g] is None:  # made when the first batch arrives: earlier groups' are gone
            self.stats[g] = self.solver.new_stats(self.inputs_of[g].in_features,
                                                  self.inputs_of[g].weight.device)
        self.stats[g].add(args[0])
        self.arrived[g] += 1
        if g == self.widest:
            # the batches hold the most here (the MLP's intermediate activations): trimming
            # between them returns the heap's free gaps before the next batch adds its own
            # (smollm2-135m Wanda: peak RSS -100 MiB for +6% time; at every group: +22% time)
            _release_free_heap()
        self.scheduler.switch()  # wait here until the scheduler has solved group g
        if not self.solved[g]:
            raise RuntimeError("a lock-step batch resumed before its group was solved")

    def _solve_ready(self, n_alive: int) -> None:
        """Solve every group that all live batches have reached (normally the one they all wait
        at; also one that a batch finishing without reaching it leaves complete)."""
        for g in range(len(self.groups)):
            if not self.solved[g] and self.arrived[g] and self.arrived[g] == n_alive:
                self.solve(g, self.stats[g])
                self.stats[g] = None  # free a Hessian as soon as its group is solved
                self.solved[g] = True
                _release_free_heap()

    def run(self, inputs: list) -> None:
        """Replace every ``inputs[b]``'s hidden state by the pruned layer's output, in place."""
        from greenlet import getcurrent, greenlet

        self.stats = [None] * len(self.groups)
        hooks = [self.layer.get_submodule(name).register_forward_pre_hook(
                     lambda mod, args, _g=g: self._hook(_g, mod, args))
                 for g, group in enumerate(self.groups) for name in group]
        self.scheduler = getcurrent()

        def forward(b: int) -> None:
            hidden, kwargs = inputs[b]
            out = self.layer(hidden, **kwargs)
            inputs[b] = (out[0] if isinstance(out, tuple) else out, kwargs)

        batches = [greenlet(forward) for _ in inputs]
        try:
            while True:
                alive = 0
                for b, gl in enumerate(batches):
                    if not gl.dead:
                        gl.switch(b)  # starts forward(b); later resumes it (b is ignored)
                        alive += not gl.dead
                if alive == 0:
                    break
                before = sum(self.solved)
                self._solve_ready(alive)
                if sum(self.solved) == before:  # the live batches wait at different groups
                    raise RuntimeError("lock-step calibration stalled: the batches wait at "
                                       "different groups; use --no-true-sequential")
        finally:
            for h in hooks:
                h.remove()
            for gl in batches:  # after an error: end the paused batches (GreenletExit)
                if gl and not gl.dead:
                    gl.throw()
        for g in range(len(self.groups)):  # groups no batch reached: solve on what there is
            if not self.solved[g]:
                lin = self.inputs_of[g]
                stats = self.stats[g]
                if stats is None:
                    stats = self.solver.new_stats(lin.in_features, lin.weight.device)
                self.solve(g, stats)
                self.solved[g] = True


@torch.no_grad()
def prune_layerwise(model: nn.Module, adapter: Adapter, solver: Solver, target: Sparsity,
                    ids: torch.Tensor, opts: EngineOptions) -> Report:
    """Prune every decoder layer of ``model`` in place with calibration token ids ``[N, L]``."""
    report = Report(masks={} if opts.keep_masks else None)
    t0 = time.perf_counter()
    inputs = capture_inputs(model, adapter, ids, opts)
    report.add_time("capture", time.perf_counter() - t0)

    layers = adapter.layers(model)
    for i, layer in enumerate(tqdm(layers, desc=f"{solver.name}", unit="layer",
                                   disable=not opts.progress)):
        prune_layer(layer, i, adapter, solver, target, inputs, opts, report,
                    propagate=i + 1 < len(layers))
    report.add_time("total", time.perf_counter() - t0)
    return report


@torch.no_grad()
def prune_layer(layer: nn.Module, i: int, adapter: Adapter, solver: Solver, target,
                inputs: list, opts: EngineOptions, report: Report, propagate: bool) -> None:
    """Calibrate, prune and (``propagate``) run decoder layer ``i`` on ``inputs`` in place.

    The one per-layer step of the engine, shared by :func:`prune_layerwise` and the streaming
    engine (:mod:`llmprune.streaming`), so both give bit-identical results."""
    device = torch.device(opts.device)
    if opts.placement is None:
        layer.to(device)
    else:
        opts.placement.place(layer)
    fwd_layer = layer
    if opts.calib_dtype is not None and next(layer.parameters()).dtype != opts.calib_dtype:
        # Forward passes in a cheaper dtype; the solver still reads and writes the
        # original (master) weights in float32.
        fwd_layer = copy.deepcopy(layer).to(opts.calib_dtype)
    groups = layer_groups(adapter, fwd_layer, inputs)
    schedule = sequential_phases(fwd_layer, groups) if opts.true_sequential else [list(groups)]
    if not any(len(p) > 1 for p in schedule) and _use_lockstep(fwd_layer, groups, inputs, opts,
                                                                 device):
        t = time.perf_counter()
        solve_seconds = 0.0

        def solve(g, stats):
            nonlocal solve_seconds
            ts = time.perf_counter()
            solve_linear_group(layer, fwd_layer, adapter, i, groups[g], solver, stats, target,
                               report)
            solve_seconds += time.perf_counter() - ts

        _Lockstep(fwd_layer, list(groups), solver, solve).run(inputs)
        report.add_time("calibrate_forward", time.perf_counter() - t - solve_seconds)
        report.add_time("solve", solve_seconds)
        schedule, propagate = [], False  # the lock-step pass's outputs are already propagated
    for phase in schedule:
        t = time.perf_counter()
        collect = opts.collect_stats or collect_layer_stats
        stats = collect(fwd_layer, phase, inputs, solver, device)
        t_solve = time.perf_counter()
        report.add_time("calibrate_forward", t_solve - t)
        for gi, group in enumerate(phase):
            solve_linear_group(layer, fwd_layer, adapter, i, group, solver, stats[gi], target,
                               report)
            stats[gi] = None  # free each group's statistics (a Hessian) once it is solved
        report.add_time("solve", time.perf_counter() - t_solve)
    t = time.perf_counter()
    if propagate:
        run_layer(fwd_layer, inputs)
    report.add_time("propagate_forward", time.perf_counter() - t)
    del fwd_layer
    if opts.placement is not None:
        opts.placement.release(layer)
    elif device.type != "cpu":
        layer.to("cpu")
    _release_free_heap()
