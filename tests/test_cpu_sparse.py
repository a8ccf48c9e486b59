"""CPU sparse kernels (llmprune.sparse.cpu, llmprune/cpu_kernels.c) against an independent torch
reference: every dispatch path, forced, over odd shapes, empty and full rows, 1..8 rows of x
(the native kernel) and more (decode to dense + F.linear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmprune.sparse import cpu

AVAILABLE = cpu.native_paths() + ("torch",)
# (out, in): odd sizes, rows that are not multiples of 8/16/32, a single row or column
SHAPES = [(1, 1), (2, 7), (3, 31), (5, 33), (17, 64), (31, 100), (33, 257), (64, 512), (130, 72)]


def reference(x: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x @ (w * keep)^T in float64: no layout, no kernel."""
    return x.double() @ torch.where(keep, w.double(), 0.0).T


def random_case(out: int, cols: int, density: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g).to(torch.bfloat16)
    keep = torch.rand(out, cols, generator=g) < density
    keep[0] = False  # a row that keeps nothing
    if out > 1:
        keep[-1] = True  # a row that keeps everything
    return w, keep


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))


@pytest.fixture(params=AVAILABLE)
def path(request, monkeypatch):
    monkeypatch.setenv(cpu.PATH_ENV, request.param)
    return request.param


def test_every_native_path_is_reported_here():
    """The CI machine has AVX-512 BF16: a build that lost a path would silently skip its tests."""
    if cpu.cpu_kernels is None:
        pytest.skip("the extension is not built")
    assert set(cpu.native_paths()) <= {"avx512", "avx2"}
    assert cpu.kernel_path() == (cpu.native_paths() or ("torch",))[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_product_matches_reference(path, shape, density):
    out, cols = shape
    w, keep = random_case(out, cols, density, seed=out * 1000 + cols)
    bw = cpu.from_dense(w, keep)
    for m in (1, 2, 3, 5, 8, 9, 17):
        x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        want = reference(x, w, keep)
        if m <= cpu.DECODE_ROWS and path != "torch":
            got = cpu.bitmask_matmul(x, bw, path)  # fp32, before the rounding to bf16
            assert got.dtype == torch.float32
            tol = 1e-5
        else:
            got = cpu.bitmask_linear(x, bw)
            tol = 1e-2  # bf16 output
        if want.abs().max() == 0:
            assert got.abs().max() == 0
        else:
            assert rel_err(got, want) <= tol, (path, shape, density, m)


def test_linear_keeps_leading_dims_dtype_and_bias(path):
    w, keep = random_case(40, 96, 0.5, seed=1)
    bias = torch.randn(40)
    x = torch.randn(2, 3, 96)
    got = cpu.bitmask_linear(x, cpu.from_dense(w, keep), bias)
    assert got.shape == (2, 3, 40) and got.dtype == torch.float32
    want = reference(x.to(torch.bfloat16).reshape(-1, 96), w, keep) + bias.double()
    assert rel_err(got.reshape(-1, 40), want) <= 1e-2


@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (33, 257), (64, 512)])
def test_decode_is_bit_exact(path, shape):
    w, keep = random_case(*shape, 0.5, seed=7)
    got = cpu.decode_dense(cpu.from_dense(w, keep))
    want = torch.where(keep, w, torch.zeros((), dtype=torch.bfloat16))
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_thread_count_does_not_change_results(path):
    """Each output row is one thread's whole dot product: the split changes no bit."""
    if path == "torch":
        pytest.skip("the torch path has no row split of its own")
    w, keep = random_case(67, 200, 0.5, seed=3)
    bw = cpu.from_dense(w, keep)
    x = torch.randn(4, 200).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(cpu.bitmask_matmul(x, bw, path))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_sparse_rows_with_dense_chunks(path):
    """Rows sparse overall (the avx512 loop's narrow loads) with some 32-column chunks dense."""
    g = torch.Generator().manual_seed(11)
    out, cols = 96, 1000
    w = torch.randn(out, cols, generator=g).to(torch.bfloat16)
    keep = torch.rand(out, cols, generator=g) < 0.15
    keep[:, 64:96] = True  # a full chunk
    keep[::3, 300:330] = True  # dense, not aligned to a chunk
    keep[-1] = True  # the last row: bounds-checked loads
    bw = cpu.from_dense(w, keep)
    for m in (1, 3, 8):
        x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        if path == "torch":
            got, tol = cpu.bitmask_linear(x, bw, path=path), 1e-2  # bf16 output
        else:
            got, tol = cpu.bitmask_matmul(x, bw, path), 1e-5  # fp32
        assert rel_err(got, reference(x, w, keep)) <= tol, (path, m)


@pytest.mark.parametrize("shape", [(1, 32), (5, 96), (37, 64), (70, 160)])
def test_dense_reference_loop_matches_reference(shape):
    """The dense loop of the bytes ceiling (rows in groups of 4 or 2, leftovers alone)."""
    if "avx512" not in cpu.native_paths():
        pytest.skip("the dense reference loop is avx512 only")
    out, cols = shape
    w = torch.randn(out, cols, generator=torch.Generator().manual_seed(out)).to(torch.bfloat16)
    for m in range(1, cpu.DECODE_ROWS + 1):
        x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        want = reference(x, w, torch.ones_like(w, dtype=torch.bool))
        assert rel_err(cpu.dense_matmul(x, w), want) < 1e-5


def test_module_replaces_linear(path):
    lin = nn.Linear(48, 24, bias=True).to(torch.bfloat16)
    keep = torch.rand(24, 48) < 0.5
    with torch.no_grad():
        lin.weight.mul_(keep)
    sp = cpu.CPUSparseLinear.from_linear(lin, keep)
    x = torch.randn(1, 5, 48).to(torch.bfloat16)
    want = reference(x.reshape(-1, 48), lin.weight.detach(), keep) + lin.bias.detach().double()
    with torch.no_grad():
        assert rel_err(sp(x).reshape(-1, 24), want) <= 1e-2
    assert "weight" not in sp.state_dict() and set(sp.state_dict()) == {"bias"}
    sp.to(torch.float32)  # a model-wide cast leaves the raw bits alone
    assert sp.values.dtype == torch.int16
    want_w = torch.where(keep, lin.weight.detach(), 0).to(torch.bfloat16)
    assert torch.equal(sp.dense_weight(), want_w)


def test_nm_values_convert_to_the_bitmask_layout():
    from llmprune.io import compact

    w = torch.randn(16, 64).to(torch.bfloat16)
    keep = torch.zeros(16, 16, 4, dtype=torch.bool)
    keep[..., 1] = keep[..., 3] = True
    keep = keep.view(16, 64)
    enc = compact.encode_nm(torch.where(keep, w, 0), keep, 2, 4)
    bw = cpu.from_nm(enc.parts["values"], compact.nm_keep(enc.parts["indices"], (16, 64), 2, 4))
    assert torch.equal(cpu.decode_dense(bw, "torch"), torch.where(keep, w, 0))


def test_without_the_extension_torch_computes_the_same(monkeypatch):
    monkeypatch.delenv(cpu.PATH_ENV, raising=False)
    w, keep = random_case(33, 70, 0.5, seed=5)
    x = torch.randn(1, 70).to(torch.bfloat16)
    monkeypatch.setattr(cpu, "cpu_kernels", None)
    assert cpu.native_paths() == () and cpu.kernel_path() == "torch"
    got = cpu.CPUSparseLinear(cpu.from_dense(w, keep))(x)
    assert rel_err(got, reference(x, w, keep)) <= 1e-2


def test_forcing_an_unknown_or_missing_path_is_a_user_error(monkeypatch):
    monkeypatch.setenv(cpu.PATH_ENV, "avx9000")
    with pytest.raises(cpu.CPUKernelError, match="choose one of"):
        cpu.kernel_path()
    monkeypatch.setenv(cpu.PATH_ENV, "avx512")
    monkeypatch.setattr(cpu, "cpu_kernels", None)
    with pytest.raises(cpu.CPUKernelError, match="not built"):
        cpu.kernel_path()


def test_layout_checks_reject_mismatched_parts():
    bits = torch.full((2, 1), 0b101, dtype=torch.uint8)  # 2 kept per row
    with pytest.raises(ValueError, match="values are given"):
        cpu.bitmask_weight(bits, torch.zeros(3, dtype=torch.bfloat16), (2, 3))
    bw = cpu.bitmask_weight(bits, torch.arange(4, dtype=torch.bfloat16), (2, 3))
    with pytest.raises(ValueError, match="features"):
        cpu.bitmask_linear(torch.zeros(1, 4), bw)


# ----------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def exports(tmp_path_factory, checkpoint_dir, text_file):
    """A tiny llama pruned by Wanda (50% and 2:4), exported compact in bf16 and in fp32."""
    from llmprune.cli import main

    base = tmp_path_factory.mktemp("cpu_sparse")
    out = {}
    for pattern in ("0.5", "2:4"):
        pruned = base / pattern.replace(":", "of")
        args = ["-q", "wanda", "--model", str(checkpoint_dir), "--calib-data", str(text_file),
                "--nsamples", "4", "--seqlen", "32", "--output", str(pruned)]
        assert main(args + (["--pattern", pattern] if ":" in pattern
                            else ["--sparsity", pattern])) == 0
        for dtype in ("bf16", "fp32"):
            out[pattern, dtype] = base / f"{pruned.name}-{dtype}"
            assert main(["-q", "export", str(pruned), "--dtype", dtype, "--output",
                         str(out[pattern, dtype])]) == 0
    return out


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_load_pretrained_keeps_bf16_exports_compressed(exports, pattern):
    import llmprune

    src = exports[pattern, "bf16"]
    sparse = llmprune.load_pretrained(src)
    dense = llmprune.load_pretrained(src, sparse="dense")
    swapped = {n: m for n, m in sparse.named_modules() if isinstance(m, cpu.CPUSparseLinear)}
    assert swapped and all(".layers." in n for n in swapped)
    assert not any(isinstance(m, cpu.CPUSparseLinear) for m in dense.modules())
    modules = dict(dense.named_modules())
    for name, mod in swapped.items():  # the compressed weights are the decoded ones, bit for bit
        assert torch.equal(mod.dense_weight().view(torch.int16),
                           modules[name].weight.view(torch.int16)), name
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for rows in (ids[:, :1], ids):  # decode (native kernel) and prefill (dense tile)
            a, b = sparse(rows).logits.float(), dense(rows).logits.float()
            assert float((a - b).abs().max() / b.abs().max()) <= 2e-2
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(sparse.generate(ids, **gen), dense.generate(ids, **gen))


def test_sparse_option_is_checked(exports):
    import llmprune
    from llmprune.core.errors import UserError

    fp32 = exports["0.5", "fp32"]
    model = llmprune.load_pretrained(fp32)  # auto: the kernels read bf16 exports only
    assert not any(isinstance(m, cpu.CPUSparseLinear) for m in model.modules())
    with pytest.raises(UserError, match="bf16"):
        llmprune.load_pretrained(fp32, sparse="cpu")
    with pytest.raises(UserError, match="sparse must be"):
        llmprune.load_pretrained(exports["0.5", "bf16"], sparse="fast")
    with pytest.raises(UserError, match="float32"):
        llmprune.load_pretrained(exports["0.5", "bf16"], sparse="cpu", dtype=torch.float32)


def test_cli_eval_and_bench_decode(exports, text_file, capsys):
    from llmprune.cli import main

    src = str(exports["0.5", "bf16"])
    ppl = {}
    for sparse in ("cpu", "dense"):
        assert main(["-q", "eval", "--model", src, "--ppl", str(text_file), "--seqlen", "32",
                     "--max-windows", "2", "--sparse", sparse]) == 0
        ppl[sparse] = float(capsys.readouterr().out.strip().splitlines()[-1].split()[-1])
    assert ppl["cpu"] == pytest.approx(ppl["dense"], rel=1e-2)
    assert main(["-q", "bench-decode", src, "--tokens", "3", "--rounds", "1", "--no-fp32"]) == 0
    out = capsys.readouterr().out
    assert "sparse" in out and "dense-bf16" in out and "speed-up" in out
    assert main(["-q", "bench-decode", str(exports["0.5", "fp32"])]) == 2
    assert "--dtype bf16" in capsys.readouterr().err
