"""Data-parallel calibration across processes (torch.distributed), e.g. one process per GPU.

    torchrun --nproc-per-node 8 -m llmprune sparsegpt --model ... --device cuda --distributed ...

What each process does (``W`` processes, ranks ``0..W-1``):

1. Every rank loads the whole model (on CPU; layers move to its device one at a time) and cuts
   the calibration ids into the same batches as a single process would (``--batch-size``). The
   batches are split **contiguously** by rank: rank ``r`` gets batches
   ``[r*B//W, (r+1)*B//W)`` of the ``B`` batches (:func:`shard_batches`). Each rank runs the
   embeddings and every layer only on its own batches.
2. For each layer, each rank accumulates its statistics (SparseGPT's ``X^T X`` and token count,
   Wanda's column sums of squares) over its batches exactly as a single process does over all
   of them, starting from zeros. The partial sums are then combined **in rank order**,
   ``S = ((P_0 + P_1) + P_2) + ...``, by a chain (rank ``r`` receives the running sum from
   ``r-1``, adds its own, passes it on) and broadcast from the last rank; integer token counts
   are all-reduced. A plain ``all_reduce(SUM)`` would add the partials in an order the backend
   chooses (a ring adds them in a different order for each chunk), and floating-point sums in
   another order differ in the last bits, which can flip a mask at a near-tie.
3. Rank 0 solves each group and broadcasts the pruned weights and masks; the other ranks copy
   them. Every rank solving the same problem would take the same wall time (the solve is not
   split), but broadcasting guarantees identical weights on every rank even where a kernel is
   not bitwise deterministic, at the cost of sending one layer's weights per layer (about
   1.7 GB for Llama-2-70B in bf16: milliseconds over NVLink, against seconds of solving).
4. Every rank propagates its own batches through the pruned layer. Only rank 0 writes output
   and shows progress bars; the others wait for it at a barrier.

Exactness. A 2-process run gives bitwise the statistics (and so the masks and weights) of a
single process that accumulates the same contiguous shards separately and adds them in rank
order, which :class:`ShardedCalibration` does (``llmprune.prune(..., parallel=
ShardedCalibration(W))``): the same float operations on the same values in the same order
(the batches are the same tensors; each rank's partial starts from zeros like each emulated
shard's; the chain adds in the emulation's order), given kernels that are deterministic for a
fixed shape on a fixed device type (true of CPU BLAS at a fixed thread count and of cuBLAS on
one GPU model). Against the *default* single-process run, which adds all batches into one
float32 accumulator, the statistics differ by float32 rounding (relative 1e-7 per entry);
the tests check that they are that close and that the masks of the tiny test models are equal,
but near-ties can in principle decide differently there. With ``W = 1`` nothing changes.

OWL allocation (``--allocation owl``) is computed by every rank on all calibration ids (the same
result everywhere), not split.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.errors import UserError
from ..solvers.base import Solved

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")


def shard_batches(n_batches: int, rank: int, world_size: int) -> range:
    """The batches rank ``rank`` calibrates on: a contiguous run, sizes differing by at most 1."""
    if n_batches < world_size:
        raise UserError(f"{n_batches} calibration batches cannot be split over {world_size} "
                        "processes; use more --nsamples, a smaller --batch-size or fewer "
                        "processes")
    return range(rank * n_batches // world_size, (rank + 1) * n_batches // world_size)


def shard_rows(n_rows: int, batch_size: int, rank: int, world_size: int) -> slice:
    """Rows of the calibration ids ``[n_rows, L]`` that make up rank ``rank``'s batches. A shard
    starts on a batch boundary, so its batches are exactly the single process's batches."""
    n_batches = -(-n_rows // batch_size)
    b = shard_batches(n_batches, rank, world_size)
    return slice(b.start * batch_size, min(b.stop * batch_size, n_rows))


def _stat_fields(st) -> list[str]:
    if not dataclasses.is_dataclass(st):
        raise TypeError(f"statistics {type(st).__name__} must be a dataclass of tensors and ints "
                        "to be combined across processes")
    return [f.name for f in dataclasses.fields(st)]


def combine_in_order(partials: list) -> object:
    """Sum statistics objects field by field in list order: ``((p0 + p1) + p2) + ...``.
    The first object is updated in place and returned. Tensors add in their own dtype (float32
    for every built-in solver); ints add exactly."""
    acc = partials[0]
    for part in partials[1:]:
        for name in _stat_fields(acc):
            a, b = getattr(acc, name), getattr(part, name)
            if isinstance(a, torch.Tensor):
                a.add_(b)
            else:
                setattr(acc, name, a + b)
    return acc


def _collect(layer, groups, inputs, solver, device) -> list:
    from .calibrate import collect_layer_stats

    return collect_layer_stats(layer, groups, inputs, solver, device)


@dataclass
class ShardedCalibration:
    """One process that accumulates statistics as ``world_size`` data-parallel processes would:
    per contiguous shard of batches, then added in shard order. Gives bitwise the statistics,
    masks and weights of a ``world_size``-process run (see the module docstring): use it to
    reproduce a multi-GPU result on one device."""

    world_size: int
    is_main: bool = True

    def adapt(self, solver, ids: torch.Tensor, opts):
        return solver, ids, dataclasses.replace(opts, collect_stats=self.collect_stats)

    def collect_stats(self, layer, groups, inputs, solver, device) -> list:
        parts = [_collect(layer, groups, [inputs[b] for b in
                                          shard_batches(len(inputs), r, self.world_size)],
                          solver, device)
                 for r in range(self.world_size)]
        return [combine_in_order([p[g] for p in parts]) if parts[0][g] is not None else None
                for g in range(len(groups))]

    def barrier(self) -> None:
        pass


@dataclass
class DataParallel:
    """This process's part of a torch.distributed data-parallel calibration (see module doc).
    Build it with :func:`init_from_env` under torchrun, or from an initialised process group."""

    rank: int
    world_size: int
    device: str = "cpu"  # this rank's compute device
    owns_group: bool = False  # init_from_env created the process group (close() destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def adapt(self, solver, ids: torch.Tensor, opts):
        """The engine's (solver, calibration ids, options) for this rank: its share of the rows,
        statistics combined across ranks, solves broadcast from rank 0."""
        rows = shard_rows(ids.shape[0], opts.batch_size, self.rank, self.world_size)
        return (_BroadcastSolver(solver), ids[rows],
                dataclasses.replace(opts, collect_stats=self.collect_stats))

    def collect_stats(self, layer, groups, inputs, solver, device) -> list:
        stats = _collect(layer, groups, inputs, solver, device)
        for st in stats:
            if st is not None:
                reduce_in_rank_order_(st, self.rank, self.world_size)
        return stats

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def reduce_in_rank_order_(st, rank: int, world_size: int) -> None:
    """Replace every field of statistics ``st`` by its sum over all ranks, in place, on every
    rank: tensors as ``((P_0 + P_1) + ...)`` by a chain of point-to-point sends (the order of
    :func:`combine_in_order`), ints by an exact all-reduce."""
    for name in _stat_fields(st):
        value = getattr(st, name)
        if isinstance(value, torch.Tensor):
            if rank > 0:
                running = torch.empty_like(value)
                dist.recv(running, src=rank - 1)
                value.copy_(running.add_(value))  # (P_0 + ... + P_{r-1}) + P_r
                del running
            if rank < world_size - 1:
                dist.send(value, dst=rank + 1)
            dist.broadcast(value, src=world_size - 1)
        elif isinstance(value, int):
            dev = next((v.device for v in vars(st).values() if isinstance(v, torch.Tensor)),
                       torch.device("cpu"))
            total = torch.tensor([value], dtype=torch.int64, device=dev)
            dist.all_reduce(total)
            setattr(st, name, int(total.item()))
        else:
            raise TypeError(f"cannot combine statistics field {name} of type {type(value)}")


class _BroadcastSolver:
    """A solver whose solves run on rank 0 only; the results are broadcast to every rank."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def solve_group(self, weights, stats, target, names):
        if dist.get_rank() == 0:
            solved = self.inner.solve_group(weights, stats, target, names)
        else:
            solved = [Solved(torch.empty(w.shape, dtype=torch.float32, device=w.device),
                             torch.empty(w.shape, dtype=torch.bool, device=w.device))
                      for w in weights]
        out = []
        for res in solved:
            weight = res.weight.to(torch.float32).contiguous()  # the other ranks' dtype
            if res.mask is None:  # rank 0's solver gave packed keep bits
                from ..core.bits import unpack_bits

                res = Solved(res.weight, unpack_bits(res.keep_bits, weight.shape[1]))
            mask = res.mask.to(torch.uint8).contiguous()  # bool is not a gloo/nccl type
            dist.broadcast(weight, src=0)
            dist.broadcast(mask, src=0)
            out.append(Solved(weight, mask.bool()))
        return out


def resolve_backend(backend: str, device: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"--dist-backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):
        raise UserError("--dist-backend nccl needs --device cuda; use gloo for CPU processes")
    return backend


def init_from_env(device: str = "cpu", backend: str = "auto",
                  timeout_minutes: float = 60.0) -> DataParallel:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). With ``device`` cuda,
    rank ``r`` computes on ``cuda:LOCAL_RANK``."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise UserError("--distributed needs the environment torchrun sets up; launch with "
                        "'torchrun --nproc-per-node N -m llmprune ... --distributed'")
    backend = resolve_backend(backend, device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise UserError(f"rank {rank} needs cuda:{local} but {torch.cuda.device_count()} "
                            "CUDA devices are visible; start at most one process per GPU")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if backend == "nccl" and not dist.is_nccl_available():
        raise UserError("this torch build has no NCCL; use --dist-backend gloo")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                        owns_group=owns)
