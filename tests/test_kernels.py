"""The 2:4 kernels (llmprune_kernels) and SparseLinear.

Triton kernels run under Triton's interpreter on CPU tensors. Triton decides whether it
interprets when it is first imported, and torch._dynamo (which transformers imports) imports it:
so this module sets TRITON_INTERPRET=1 before anything imports Triton when it can; when another
test module got there first, the interpreter cases run in a subprocess instead
(test_interpreter_cases_in_a_subprocess). GPU cases are marked `gpu` and skipped without CUDA.
"""

from __future__ import annotations

import os
import sys

if "triton" not in sys.modules:  # must come before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import llmprune_kernels as K  # noqa: E402
from llmprune.io import compact  # noqa: E402
from llmprune.core.errors import PatternError, UserError  # noqa: E402
from llmprune.sparse.linear import (DispatchTable, KernelError, SparseLinear, choose,
                                    compress_weight, dispatch_path, measure_backends)
from llmprune.sparse.apply import apply_kernels
from llmprune_kernels.triton_ops import interpreter_ready  # noqa: E402

from tests.conftest import VOCAB, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERP = K.triton_installed() and interpreter_ready()
interp = pytest.mark.skipif(not INTERP, reason="needs Triton's interpreter in this process "
                            "(covered by test_interpreter_cases_in_a_subprocess)")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {4: torch.int32, 2: torch.int16}
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)  # interpreter: several tiles, ragged edges
# kernel vs twin: both accumulate in float32 and round once, in different orders, so they may
# differ by one unit in the last place of the output dtype (fp16: 2**-10, bf16: 2**-7 relative)
RTOL = {torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(INT_VIEW[a.element_size()]),
                            b.contiguous().view(INT_VIEW[b.element_size()])))


def rand24(out: int, cols: int, dtype=torch.float32, seed: int = 0, short_groups: bool = False,
           device="cpu") -> torch.Tensor:
    """A random weight with exactly 2 nonzeros per group of 4 (``short_groups``: a few groups
    with 0 or 1)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen) + 0.1  # no accidental zeros
    drop = torch.rand(out, cols // 4, 4, generator=gen).argsort(-1)[..., :2]
    w.view(out, cols // 4, 4).scatter_(-1, drop, 0.0)
    if short_groups and cols >= 8:
        w[0, :8] = 0.0  # two empty groups
        w[min(1, out - 1), 4:8] = torch.tensor([0.0, 0.0, 0.0, 0.5])  # one kept
        w[out - 1, -4:] = torch.tensor([0.7, 0.0, 0.0, 0.0])
    return w.to(device=device, dtype=dtype)


# ============================================================================ reference twins
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 36), (5, 100), (16, 64), (3, 4)])
def test_compress_ref_is_the_export_layout(dtype, shape):
    """compress_ref writes exactly what the export's encoder writes: no re-packing between an
    export and the kernels."""
    w = rand24(*shape, dtype)
    assert bool(((w != 0).view(shape[0], -1, 4).sum(-1) == 2).all())
    values, indices = K.compress_ref(w)
    enc = compact.encode_nm(w, w != 0, 2, 4)
    assert same_bits(values, enc.parts["values"])
    assert torch.equal(indices, enc.parts["indices"])
    assert indices.dtype == torch.uint8 and indices.shape == (shape[0], -(-shape[1] // 8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_compress_ref_pads_short_groups_like_the_export(dtype):
    w = rand24(6, 44, dtype, seed=1, short_groups=True)
    values, indices = K.compress_ref(w)
    enc = compact.encode_nm(w, w != 0, 2, 4)
    assert same_bits(values, enc.parts["values"]) and torch.equal(indices, enc.parts["indices"])
    # and with an explicit keep mask that keeps a zero weight
    keep = w != 0
    keep[2, 0] = keep[2, 1] = True
    keep[2, 2] = keep[2, 3] = False
    w2 = w.clone()
    w2[2, :4] = torch.tensor([0.0, 1.5, 0.0, 0.0]).to(dtype)
    values, indices = K.compress_ref(w2, keep)
    enc = compact.encode_nm(w2, keep, 2, 4)
    assert same_bits(values, enc.parts["values"]) and torch.equal(indices, enc.parts["indices"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [36, 100, 64])
def test_decompress_ref_round_trip(dtype, cols):
    w = rand24(9, cols, dtype, seed=2, short_groups=True)
    values, indices = K.compress_ref(w)
    assert same_bits(K.decompress_ref(values, indices, cols), w)
    # and equals the export's own decoder on the same parts
    dec = compact.decode("nm", {"values": values, "indices": indices}, w.shape, 2, 4)
    assert same_bits(K.decompress_ref(values, indices, cols), dec)


def test_decompress_ref_by_hand():
    # row 0: groups [a 0 0 b] and [0 c d 0]; row 1: [0 0 e f] and [g h 0 0]
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    # indices (0,3),(1,2) -> fields 0,3,1,2 -> 0b10_01_11_00; (2,3),(0,1) -> 0b01_00_11_10
    indices = torch.tensor([[0b10011100], [0b01001110]], dtype=torch.uint8)
    want = torch.tensor([[1.0, 0, 0, 2.0, 0, 3.0, 4.0, 0], [0, 0, 5.0, 6.0, 7.0, 8.0, 0, 0]])
    assert torch.equal(K.decompress_ref(values, indices, 8), want)
    assert all(torch.equal(a, b) for a, b in zip(K.compress_ref(want), (values, indices)))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_ref_is_linear(dtype, bias):
    w = rand24(24, 100, dtype, seed=3)
    b = torch.randn(24).to(dtype) if bias else None
    x = torch.randn(2, 5, 100).to(dtype)
    values, indices = K.compress_ref(w)
    y = K.matmul_ref(x, values, indices, b)
    assert y.shape == (2, 5, 24) and y.dtype == dtype
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    if dtype == torch.float32:
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-6, atol=1e-6)


# ============================================================================ bad input
def test_ref_bad_input_is_one_clear_line():
    w = rand24(4, 16)
    w[2, 4:7] = 1.0  # 3 of 4 kept
    with pytest.raises(K.NotTwoFourError, match=r"not 2:4: row 2, columns 4\.\.7") as exc:
        K.compress_ref(w)
    assert isinstance(exc.value, ValueError) and "\n" not in str(exc.value)
    with pytest.raises(K.KernelInputError, match="multiple of 4"):
        K.compress_ref(torch.zeros(4, 6))
    with pytest.raises(K.KernelInputError, match="dtype"):
        K.compress_ref(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(K.KernelInputError, match="2-D"):
        K.compress_ref(torch.zeros(8))
    values, indices = K.compress_ref(rand24(4, 16))
    bad = indices.clone()
    bad[1, 0] = 0b00000101  # group 0 of row 1: indices (1, 1)
    with pytest.raises(K.KernelInputError, match="strictly increasing"):
        K.decompress_ref(values, bad, 16)
    with pytest.raises(K.KernelInputError, match="values must be"):
        K.decompress_ref(values, indices, 20)
    with pytest.raises(K.KernelInputError, match="input is torch.float16"):
        K.matmul_ref(torch.randn(2, 16).half(), values, indices)
    with pytest.raises(K.KernelInputError, match="bias must be"):
        K.matmul_ref(torch.randn(2, 16), values, indices, torch.randn(5))


def test_compress_weight_names_the_tensor():
    w = rand24(4, 16)
    w[3, 12:16] = 1.0
    with pytest.raises(PatternError, match=r"^layers\.0\.q\.weight: the weight is not 2:4: row 3"):
        compress_weight(w, name="layers.0.q.weight")
    with pytest.raises(PatternError, match="multiple of 4"):
        SparseLinear.from_dense(torch.zeros(4, 10))


def test_compress_weight_on_cpu_uses_the_export_encoder():
    w = rand24(8, 40, torch.bfloat16, seed=4, short_groups=True)
    values, indices = compress_weight(w)
    ref = K.compress_ref(w)
    assert same_bits(values, ref[0]) and torch.equal(indices, ref[1])


# ============================================================================ Triton kernels
@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(24, 36), (5, 100), (33, 64), (2, 4)])
def test_triton_compress_decompress_bit_exact(dtype, shape):
    w = rand24(*shape, dtype, seed=5, short_groups=True)
    w[0, 1] = -0.0  # a pruned -0.0 counts as zero
    values, indices = K.compress(w, block_n=16, block_q=2)
    ref_v, ref_i = K.compress_ref(w)
    assert same_bits(values, ref_v) and torch.equal(indices, ref_i)
    dense = K.decompress(values, indices, shape[1], block_n=16, block_q=2)
    assert same_bits(dense, K.decompress_ref(ref_v, ref_i, shape[1]))
    # with an explicit keep mask, from a non-contiguous view of the weight
    keep = w != 0
    wt = w.t().contiguous().t()
    values, indices = K.compress(wt, keep, block_n=8, block_q=4)
    assert same_bits(values, ref_v) and torch.equal(indices, ref_i)


@interp
def test_triton_compress_and_decompress_refuse_bad_input():
    w = rand24(20, 36)
    w[17, 32:35] = 2.0
    with pytest.raises(K.NotTwoFourError, match=r"row 17, columns 32\.\.35"):
        K.compress(w, block_n=8, block_q=2)
    values, indices = K.compress_ref(rand24(20, 36))
    bad = indices.clone()
    bad[9, 4] = 0b00001011  # last group (the odd one out): indices (3, 2)
    with pytest.raises(K.KernelInputError, match="strictly increasing"):
        K.decompress(values, bad, 36, block_n=8, block_q=2)
    with pytest.raises(K.KernelInputError, match="multiple of 4"):
        K.compress(torch.zeros(4, 10))


@interp
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cols", [36, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matmul_matches_ref(dtype, cols, bias):
    w = rand24(40, cols, dtype, seed=6, short_groups=True)
    b = torch.randn(40).to(dtype) if bias else None
    values, indices = K.compress_ref(w)
    for m in (1, 3, 17):
        x = torch.randn(m, cols).to(dtype)
        y = K.matmul(x, values, indices, b, blocks=SMALL)
        assert y.shape == (m, 40) and y.dtype == dtype
        torch.testing.assert_close(y, K.matmul_ref(x, values, indices, b), rtol=RTOL[dtype],
                                   atol=1e-3)


@interp
def test_triton_matmul_strided_batched_input_and_default_blocks():
    w = rand24(24, 72, seed=7)
    values, indices = K.compress_ref(w)
    x = torch.randn(72, 2, 5).permute(1, 2, 0)  # [2, 5, 72], last dim not contiguous
    y = K.matmul(x, values, indices)  # interpreter default blocks
    assert y.shape == (2, 5, 24)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-4, atol=1e-5)
    assert K.matmul(torch.randn(0, 72), values, indices).shape == (0, 24)
    with pytest.raises(K.KernelInputError, match="BLOCK_K must be a multiple of 8"):
        K.matmul(x, values, indices, blocks=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=20))


# ============================================================================ SparseLinear
def _linear(out=24, cols=36, dtype=torch.float32, bias=True, seed=8) -> nn.Linear:
    lin = nn.Linear(cols, out, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(rand24(out, cols, dtype, seed=seed, short_groups=True))
    return lin


@pytest.mark.parametrize("storage", ["compact", "dense", "both"])
def test_sparse_linear_auto_on_cpu_is_bit_identical(storage):
    lin = _linear(dtype=torch.bfloat16)
    sl = SparseLinear.from_linear(lin, storage=storage)
    x = torch.randn(3, 7, 36).to(torch.bfloat16)
    assert sl.backend_for(x) == "dense"
    with torch.no_grad():
        assert same_bits(sl(x), lin(x))
    assert same_bits(sl.dense_weight(), lin.weight.detach())
    assert (sl.values is None) == (storage == "dense")


def test_sparse_linear_state_and_moves():
    lin = _linear()
    sl = SparseLinear.from_linear(lin)
    assert set(sl.state_dict()) == {"values", "indices", "bias"}
    assert sl.values.shape == (24, 18) and sl.indices.shape == (24, 5)
    half = copy.deepcopy(sl).to(torch.float16)
    assert half.values.dtype == torch.float16 and half.indices.dtype == torch.uint8
    assert same_bits(half.dense_weight(), lin.weight.detach().half())  # cache dropped by .to
    assert "holds=compact" in repr(sl)
    dense_only = SparseLinear.from_linear(lin, storage="dense")
    assert set(dense_only.state_dict()) == {"weight", "bias"}  # same keys as nn.Linear
    v, i = dense_only.compact()
    ref = K.compress_ref(lin.weight.detach())
    assert same_bits(v, ref[0]) and torch.equal(i, ref[1])


def test_sparse_linear_refuses_what_it_cannot_run(monkeypatch):
    lin = _linear()
    with pytest.raises(KernelError, match="unknown 2:4 backend"):
        SparseLinear.from_linear(lin, backend="cuda-magic")
    semi = SparseLinear.from_linear(lin, backend="cusparselt")
    assert semi.backend == "torch-semi-structured"
    with torch.no_grad(), pytest.raises(KernelError, match="semi-structured sparsity cannot run"):
        semi(torch.randn(2, 36))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tri = SparseLinear.from_linear(lin, backend="triton")
    with torch.no_grad(), pytest.raises(KernelError, match="triton backend cannot run on cpu"):
        tri(torch.randn(2, 36))
    # autograd: auto falls back to dense (gradients flow), a forced kernel refuses
    auto = SparseLinear.from_linear(lin)
    x = torch.randn(2, 36, requires_grad=True)
    auto(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(2, -1))
    with pytest.raises(KernelError, match="for inference"):
        tri(torch.randn(2, 36, requires_grad=True))


@interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear_forced_triton_under_the_interpreter(dtype):
    lin = _linear(out=40, cols=100, dtype=dtype)
    sl = SparseLinear.from_linear(lin, backend="triton")
    x = torch.randn(2, 3, 100).to(dtype)
    with torch.no_grad():
        y = sl(x)
        want = K.matmul_ref(x, sl.values, sl.indices, sl.bias)
    assert sl.backend_for(x) == "triton"
    torch.testing.assert_close(y, want, rtol=RTOL[dtype], atol=1e-3)


# ============================================================================ dispatch table
def test_dispatch_table_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    assert dispatch_path() == tmp_path / "cache" / "kernel_dispatch.json"
    calls = []

    def fake_measure(device, dtype, shape):
        calls.append((str(device), dtype, shape))
        ms = {"dense": [1.0, 1.0, 1.0], "triton": [0.5, 0.97, 2.0]}
        return {"buckets": [1, 16, 256], "ms": ms, "choice": choose(ms, 3)}

    table = DispatchTable(measure=fake_measure)
    assert table.path == dispatch_path()
    got = [table.backend("cpu", torch.float16, (64, 128), m) for m in (1, 2, 16, 17, 9999)]
    # triton only where it beats dense by the margin; between buckets the next bucket up
    assert got == ["triton", "dense", "dense", "dense", "dense"]
    assert len(calls) == 1
    saved = json.loads(dispatch_path().read_text())
    assert len(saved["entries"]) == 1 and next(iter(saved["entries"].values()))["choice"] == [
        "triton", "dense", "dense"]

    def no_measure(*args):
        raise AssertionError("measured again")

    again = DispatchTable(measure=no_measure)
    assert again.backend("cpu", torch.float16, (64, 128), 1) == "triton"
    table.backend("cpu", torch.float16, (128, 64), 1)  # another shape: measured, merged
    assert len(json.loads(dispatch_path().read_text())["entries"]) == 2
    dispatch_path().write_text("{broken")  # a damaged cache is re-measured, not fatal
    assert DispatchTable(measure=fake_measure).backend("cpu", torch.float16, (64, 128), 1) == \
        "triton"


@interp
def test_measure_backends_for_real(tmp_path):
    # median of 5: with 2 reps one preemption of a dense call (seen once in a fresh-clone run
    # sharing the 2 cores with another job) made dense look slower than the interpreter
    entry = measure_backends("cpu", torch.float32, (32, 64), ["dense", "triton"], buckets=(1, 8),
                             reps=5, warmup=1)
    assert entry["buckets"] == [1, 8] and set(entry["ms"]) == {"dense", "triton"}
    assert all(t > 0 for times in entry["ms"].values() for t in times)
    assert entry["choice"] == ["dense", "dense"]  # the interpreter never beats F.linear


# ============================================================================ tiny Llama
@pytest.fixture(scope="module")
def pruned_llama():
    import llmprune

    model = tiny_model("llama")
    report = llmprune.prune(model, llmprune.PruneRecipe(method="magnitude", pattern="2:4"),
                            keep_masks=True, progress=False)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    return model, report, ids, logits


def _swapped(model) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def test_tiny_llama_auto_on_cpu_is_bit_identical(pruned_llama):
    model, report, ids, logits = pruned_llama
    assert len(report.masks) == 14
    sparse = apply_kernels(copy.deepcopy(model), report.masks, kernels="auto")
    swapped = _swapped(sparse)
    assert set(swapped) == set(report.masks)
    with torch.no_grad():
        assert torch.equal(sparse(ids).logits, logits)
    # the compact form held instead (as on a CUDA machine): decompressed bit for bit
    compact_model = copy.deepcopy(model)
    for name, mask in report.masks.items():
        parent, _, child = name.rpartition(".")
        lin = compact_model.get_submodule(name)
        keep = compact.unpack_bits(mask, lin.in_features).view(lin.weight.shape)
        setattr(compact_model.get_submodule(parent), child,
                SparseLinear.from_linear(lin, keep, storage="compact"))
    with torch.no_grad():
        assert torch.equal(compact_model(ids).logits, logits)
    assert apply_kernels(model, report.masks, kernels="dense") is model and not _swapped(model)


@interp
def test_tiny_llama_forced_triton_matches_dense(pruned_llama):
    model, report, ids, logits = pruned_llama
    sparse = apply_kernels(copy.deepcopy(model), report.masks, kernels="triton")
    swapped = _swapped(sparse)
    assert len(swapped) == 14 and all(m.backend == "triton" for m in swapped.values())
    with torch.no_grad():
        got = sparse(ids).logits
    torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-5)


@interp
def test_compact_checkpoint_feeds_the_kernels_as_stored(pruned_llama, tmp_path):
    import llmprune
    from safetensors import safe_open

    from llmprune.io.export import export
    from llmprune.io.sources import model_source

    model, report, ids, logits = pruned_llama
    out = tmp_path / "compact"
    out.mkdir()
    meta = export(model_source(model, report.masks, {"target": "2:4"}), out, progress=False)
    loaded = llmprune.load_pretrained(out)
    sparse = apply_kernels(loaded, out, kernels="triton")
    swapped = _swapped(sparse)
    nm = [n for n, i in meta["tensors"].items() if i["encoding"] == "nm"]
    assert sorted(f"{n}.weight" for n in swapped) == sorted(nm) and len(nm) == 14
    for name in nm:
        mod = swapped[name.removesuffix(".weight")]
        with safe_open(str(out / meta["tensors"][name]["shard"]), framework="pt") as f:
            assert same_bits(mod.values, f.get_tensor(f"{name}.values"))
            assert torch.equal(mod.indices, f.get_tensor(f"{name}.indices"))
        dense = model.get_submodule(name.removesuffix(".weight")).weight.detach()
        ref_v, ref_i = K.compress_ref(dense)  # the stored bytes are what the kernels would make
        assert same_bits(mod.values, ref_v) and torch.equal(mod.indices, ref_i)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, logits, rtol=1e-4, atol=1e-5)
    # the metadata alone (no shards read): compressed from the loaded weights
    by_meta = apply_kernels(llmprune.load_pretrained(out), meta, kernels="triton")
    assert set(_swapped(by_meta)) == set(swapped)


@pytest.mark.parametrize("layout", ["pruning-run", "dense-export"])
def test_dense_checkpoints_name_their_two_four_linears(pruned_llama, tmp_path, layout):
    """A pruning run's own output (llmprune.json + masks file) and a dense export (per-tensor
    table): every 2:4 linear is found, and auto on CPU stays bit-identical."""
    from transformers import AutoModelForCausalLM

    from llmprune.io.checkpoints import write_checkpoint
    from llmprune.io.export import export
    from llmprune.io.sources import model_source

    model, report, ids, logits = pruned_llama
    out = tmp_path / layout
    out.mkdir()
    meta = {"format": "llmprune-dense", "target": "2:4",
            "layers": {name: {} for name in report.masks}}
    if layout == "pruning-run":
        write_checkpoint(model, None, out, meta, report.masks, progress=False)
    else:
        export(model_source(model, report.masks, meta), out, fmt="dense", progress=False)
        assert "tensors" in json.loads((out / "llmprune.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    sparse = apply_kernels(loaded, out, kernels="auto")
    assert set(_swapped(sparse)) == set(report.masks)
    with torch.no_grad():
        assert torch.equal(sparse(ids).logits, logits)
    unstructured = dict(meta, target="50%")  # nothing is 2:4: nothing is swapped
    assert not _swapped(apply_kernels(copy.deepcopy(model), unstructured, kernels="auto"))


def test_apply_kernels_refuses_bad_requests(pruned_llama, tmp_path):
    model, report, _, _ = pruned_llama
    with pytest.raises(KernelError, match="kernels must be one of"):
        apply_kernels(model, report.masks, kernels="fast")
    with pytest.raises(UserError, match="not an llmprune checkpoint directory"):
        apply_kernels(model, tmp_path, kernels="auto")
    with pytest.raises(UserError, match="takes a checkpoint directory"):
        apply_kernels(model, {"a": 1}, kernels="auto")
    with pytest.raises(UserError, match="not a module"):
        apply_kernels(copy.deepcopy(model), {"model.layers.9.mlp.up_proj": None})
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.layers[1].mlp.up_proj.weight[5, 8:12] = 1.0
    with pytest.raises(PatternError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: .*not 2:4"):
        apply_kernels(bad, {"model.layers.1.mlp.up_proj.weight": None}, kernels="auto")
    if not torch.cuda.is_available():
        with pytest.raises(KernelError, match="needs a CUDA GPU"):
            apply_kernels(model, report.masks, kernels="cusparselt")


# ============================================================================ packaging
def test_kernels_import_without_triton_and_never_as_kernels(tmp_path):
    code = ("import sys, importlib.util\n"
            "import llmprune_kernels, llmprune.sparse.linear\n"
            "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(llmprune_kernels.__file__)\n"
            "print(spec.origin if spec else 'none')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    ours, kernels_origin = r.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "llmprune_kernels" / "__init__.py"
    assert kernels_origin == "none" or Path(kernels_origin).resolve().parent != ROOT / "kernels"


def test_repo_root_does_not_shadow_huggingface_kernels():
    """From the repository root (where `python -m pytest` puts '' first on sys.path), `import
    kernels` is Hugging Face's package when installed, never this repository's kernels/ folder:
    transformers 5.25 imports `kernels` when importing its models."""
    code = ("import importlib.util\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec and spec.origin else 'none')\n"
            "from transformers import LlamaConfig\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    origin = r.stdout.split()[0]
    assert origin == "none" or not Path(origin).resolve().is_relative_to(ROOT / "kernels")


@pytest.mark.skipif(INTERP or not K.triton_installed(),
                    reason="the interpreter cases run in this process")
def test_interpreter_cases_in_a_subprocess():
    """Triton was imported (by torch._dynamo, via transformers) before this module could set
    TRITON_INTERPRET: run this file's interpreter cases in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-m", "not gpu", "-k", "not in_a_subprocess", str(Path(__file__))],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    summary = r.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, tail


# ============================================================================ GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_kernels_match_ref_and_dense(dtype):
    for out, cols in ((256, 512), (320, 1000), (1024, 4096)):
        w = rand24(out, cols, dtype, seed=9, short_groups=True, device="cuda")
        values, indices = K.compress(w)
        ref_v, ref_i = K.compress_ref(w)
        assert same_bits(values, ref_v) and torch.equal(indices, ref_i)
        assert same_bits(K.decompress(values, indices, cols), w)
        b = torch.randn(out, device="cuda").to(dtype)
        for m in (1, 7, 33, 300, 2048):
            x = torch.randn(m, cols, device="cuda").to(dtype)
            y = K.matmul(x, values, indices, b)  # autotuned: small-M and large-M configs
            torch.testing.assert_close(y, K.matmul_ref(x, values, indices, b), rtol=RTOL[dtype],
                                       atol=2e-3)
            tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}[dtype]
            torch.testing.assert_close(y.float(), F.linear(x, w, b).float(), rtol=tol,
                                       atol=tol * 4)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_semi_structured_matches_dense(dtype):
    w = rand24(512, 1024, dtype, seed=10, device="cuda")
    if not K.semi_structured_usable(w.device, dtype, tuple(w.shape)):
        pytest.skip("no semi-structured sparsity on this GPU (needs sm80+)")
    semi = K.to_semi_structured(w)
    b = torch.randn(512, device="cuda").to(dtype)
    for m in (1, 64, 1000):
        x = torch.randn(m, 1024, device="cuda").to(dtype)
        torch.testing.assert_close(K.semi_structured_linear(x, semi, b).float(),
                                   F.linear(x, w, b).float(), rtol=1.6e-2, atol=3e-2)


@gpu
@needs_cuda
def test_gpu_sparse_linear_auto_dispatch(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path))
    lin = _linear(out=1024, cols=2048, dtype=torch.float16).cuda()
    sl = SparseLinear.from_linear(lin)
    with torch.no_grad():
        for m in (1, 64, 2048):
            x = torch.randn(m, 2048, device="cuda", dtype=torch.float16)
            torch.testing.assert_close(sl(x).float(), lin(x).float(), rtol=2e-3, atol=8e-3)
    assert dispatch_path().exists()
    for backend in ("triton", "cusparselt"):
        forced = SparseLinear.from_linear(lin, backend=backend)
        x = torch.randn(300, 2048, device="cuda", dtype=torch.float16)
        if backend == "cusparselt" and not K.semi_structured_usable("cuda", torch.float16,
                                                                    (1024, 2048)):
            continue
        with torch.no_grad():
            torch.testing.assert_close(forced(x).float(), lin(x).float(), rtol=2e-3, atol=8e-3)
