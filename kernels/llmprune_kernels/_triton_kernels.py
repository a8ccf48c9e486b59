"""Triton sources of the 2:4 kernels. Imported only by :mod:`.triton_ops`, only when a Triton op
runs: importing this module imports Triton.

The layout is the one of :mod:`.reference` (llmprune's compact ``nm`` encoding for 2:4). Kernel
functions are plain Python here and jitted by :func:`kernels` on first use, once for compiled
mode and once for the interpreter (``TRITON_INTERPRET=1``), since Triton decides which at
decoration time.
"""

from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------- compress
def _compress(w_ptr, keep_ptr, v_ptr, i_ptr, err_ptr, N, K, NBYTES,
              stride_w, stride_keep, stride_v, stride_i,
              MAG: tl.constexpr, HAS_KEEP: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    # Dense 2:4 weight -> compact. The weight is read as integers of its width (bit-exact for any
    # float dtype); "kept" is `keep != 0` if a mask is given, else `w != 0` (bits & MAG != 0, so
    # -0.0 counts as zero). Per group of 4 the two slots are the kept positions padded with the
    # lowest pruned ones: pruned position j is a slot iff (pruned positions before j) < 2 - kept.
    # Each program covers BLOCK_N rows x BLOCK_Q index bytes; byte q holds groups 2q and 2q+1.
    pid_n = tl.program_id(0)
    pid_q = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :]
    n_groups = K // 4
    rmask = rows < N
    byte = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.int32)
    bad = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.int32)
    for h in tl.static_range(2):
        g = 2 * qs + h
        m = rmask & (g < n_groups)
        wrow = w_ptr + rows * stride_w + 4 * g
        w0 = tl.load(wrow, mask=m, other=0)
        w1 = tl.load(wrow + 1, mask=m, other=0)
        w2 = tl.load(wrow + 2, mask=m, other=0)
        w3 = tl.load(wrow + 3, mask=m, other=0)
        if HAS_KEEP:
            krow = keep_ptr + rows * stride_keep + 4 * g
            k0 = (tl.load(krow, mask=m, other=0) != 0).to(tl.int32)
            k1 = (tl.load(krow + 1, mask=m, other=0) != 0).to(tl.int32)
            k2 = (tl.load(krow + 2, mask=m, other=0) != 0).to(tl.int32)
            k3 = (tl.load(krow + 3, mask=m, other=0) != 0).to(tl.int32)
        else:
            k0 = ((w0 & MAG) != 0).to(tl.int32)
            k1 = ((w1 & MAG) != 0).to(tl.int32)
            k2 = ((w2 & MAG) != 0).to(tl.int32)
            k3 = ((w3 & MAG) != 0).to(tl.int32)
        need = 2 - (k0 + k1 + k2 + k3)  # pruned positions to take as padding (< 0: not 2:4)
        bad += (m & (need < 0)).to(tl.int32)
        s0 = (k0 == 1) | (0 < need)
        s1 = (k1 == 1) | ((1 - k0) < need)
        s2 = (k2 == 1) | ((2 - k0 - k1) < need)
        s3 = (k3 == 1) | ((3 - k0 - k1 - k2) < need)
        lo = tl.where(s0, 0, tl.where(s1, 1, 2))  # exactly two slots: the lowest ...
        hi = tl.where(s3, 3, tl.where(s2, 2, 1))  # ... and the highest
        vlo = tl.where(s0, w0, tl.where(s1, w1, w2))
        vhi = tl.where(s3, w3, tl.where(s2, w2, w1))
        vrow = v_ptr + rows * stride_v + 2 * g
        tl.store(vrow, vlo, mask=m)
        tl.store(vrow + 1, vhi, mask=m)
        nib = tl.where(m, lo | (hi << 2), 0)
        byte = byte | (nib << (4 * h))
    tl.store(i_ptr + rows * stride_i + qs, byte.to(tl.uint8), mask=rmask & (qs < NBYTES))
    tl.store(err_ptr + pid_n * tl.num_programs(1) + pid_q, tl.sum(tl.sum(bad, axis=1), axis=0))


# ----------------------------------------------------------------------------- decompress
def _decompress(v_ptr, i_ptr, o_ptr, err_ptr, N, K, NBYTES, stride_v, stride_i, stride_o,
                BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    # Compact -> dense: W[r, 4g + j] = value lo of group g if j == lo, value hi if j == hi, else
    # +0 (values moved as integers of their width: bit-exact). Flags groups whose indices are not
    # strictly increasing.
    pid_n = tl.program_id(0)
    pid_q = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :]
    n_groups = K // 4
    rmask = rows < N
    byte = tl.load(i_ptr + rows * stride_i + qs, mask=rmask & (qs < NBYTES), other=0).to(tl.int32)
    bad = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.int32)
    for h in tl.static_range(2):
        g = 2 * qs + h
        m = rmask & (g < n_groups)
        nib = (byte >> (4 * h)) & 15
        lo = nib & 3
        hi = nib >> 2
        bad += (m & (lo >= hi)).to(tl.int32)
        vrow = v_ptr + rows * stride_v + 2 * g
        vlo = tl.load(vrow, mask=m, other=0)
        vhi = tl.load(vrow + 1, mask=m, other=0)
        zero = tl.zeros_like(vlo)
        orow = o_ptr + rows * stride_o + 4 * g
        for j in tl.static_range(4):
            tl.store(orow + j, tl.where(lo == j, vlo, tl.where(hi == j, vhi, zero)), mask=m)
    tl.store(err_ptr + pid_n * tl.num_programs(1) + pid_q, tl.sum(tl.sum(bad, axis=1), axis=0))


# ----------------------------------------------------------------------------- matmul
def _matmul(x_ptr, v_ptr, i_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
            stride_xm, stride_xk, stride_v, stride_i, stride_ym,
            HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            GROUP_M: tl.constexpr):
    # y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W 2:4 given compact. Per K step the kernel loads a
    # [BLOCK_N, BLOCK_K/2] tile of values and a [BLOCK_N, BLOCK_K/8] tile of index bytes (half the
    # weight bytes plus 1/8), expands them in registers to the dense [BLOCK_N, BLOCK_K] tile
    # (column 4g + j of the tile = value lo of group g if j == lo, value hi if j == hi, else 0) and
    # accumulates x_tile @ w_tile^T in float32 with tl.dot. M_BUCKET only keys the autotuner.
    # BLOCK_K is a multiple of 8, so a tile covers whole index bytes.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: GROUP_M consecutive row blocks walk the N blocks together, so the
    # weight tiles they share are read from L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rh = tl.arange(0, BLOCK_K // 2)
    rb = tl.arange(0, BLOCK_K // 8)
    k_half = K // 2
    n_bytes = (K // 4 + 1) // 2
    xm = rm[:, None] < M
    wn = rn[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kx = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kx[None, :] * stride_xk,
                    mask=xm & (kx[None, :] < K), other=0.0)
        kv = k0 // 2 + rh
        v = tl.load(v_ptr + rn[:, None] * stride_v + kv[None, :],
                    mask=wn & (kv[None, :] < k_half), other=0.0)  # [BLOCK_N, BLOCK_K / 2]
        kb = k0 // 8 + rb
        byte = tl.load(i_ptr + rn[:, None] * stride_i + kb[None, :],  # [BLOCK_N, BLOCK_K / 8]
                       mask=wn & (kb[None, :] < n_bytes), other=0).to(tl.int32)
        # nibble of group 2q is the low half of byte q, of group 2q + 1 the high half
        nib = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, BLOCK_K // 4))
        lo = nib & 3
        hi = nib >> 2
        vlo, vhi = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))
        zero = tl.zeros_like(vlo)
        d0 = tl.where(lo == 0, vlo, zero)  # hi > lo >= 0: hi is never 0
        d1 = tl.where(lo == 1, vlo, tl.where(hi == 1, vhi, zero))
        d2 = tl.where(lo == 2, vlo, tl.where(hi == 2, vhi, zero))
        d3 = tl.where(hi == 3, vhi, zero)  # lo < hi <= 3: lo is never 3
        # [BLOCK_N, BLOCK_K/4, 2, 2] with [.., t, s] = d_{2t+s}, i.e. column 4g + j holds d_j
        w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))
        if UPCAST:  # the interpreter's dot has no bfloat16
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:  # float32 in full precision, as torch does by default (no TF32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=xm & (rn[None, :] < N))


# Autotune configs (compiled mode only). Decode / small M: one 16-row block, narrow N blocks and
# long K steps, so there are enough programs to fill the GPU and each streams its weight rows.
SMALL_M_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1},
                  num_warps=w, num_stages=s)
    for bn, bk, w, s in [(16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3),
                         (64, 128, 4, 4), (64, 64, 4, 5), (32, 512, 8, 2)]
]
# Prefill / large M: tensor-core sized tiles, grouped launch order.
LARGE_M_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                  num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                             (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                             (64, 64, 64, 4, 4), (32, 64, 64, 4, 4)]
]
SMALL_M_MAX = 32  # M <= this uses SMALL_M_CONFIGS

_CACHE: dict[bool, dict] = {}


def _autotune(configs):
    kw = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kw["cache_results"] = True  # keep the tuned choice on disk, next to Triton's own cache
    return triton.autotune(configs, key=["M_BUCKET", "N", "K", "HAS_BIAS"], **kw)


def kernels() -> dict:
    """The jitted kernels for the current mode (compiled or interpreter)."""
    mode = interpreting()
    if mode not in _CACHE:
        mm = triton.jit(_matmul)
        _CACHE[mode] = {
            "compress": triton.jit(_compress),
            "decompress": triton.jit(_decompress),
            "matmul": mm,
            "matmul_small": None if mode else _autotune(SMALL_M_CONFIGS)(mm),
            "matmul_large": None if mode else _autotune(LARGE_M_CONFIGS)(mm),
        }
    return _CACHE[mode]
