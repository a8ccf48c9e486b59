"""Compact encodings: bit-exact round trips (hypothesis) and byte counts against the formulas."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from llmprune.io import compact

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so -0.0 != +0.0 and NaN == NaN in comparisons."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _keep_mask(kind, out, cols, ratio, n, m, gen):
    if kind == "dense":
        return torch.ones(out, cols, dtype=torch.bool)
    if kind == "zero_rows":
        keep = torch.rand(out, cols, generator=gen) >= 0.5
        keep[:: 2] = False  # every other row fully pruned
        return keep
    if kind == "nm":
        score = torch.rand(out, cols // m, m, generator=gen)
        idx = score.topk(n, dim=-1).indices
        keep = torch.zeros(out, cols // m, m, dtype=torch.bool).scatter_(-1, idx, True)
        return keep.view(out, cols)
    return torch.rand(out, cols, generator=gen) >= ratio


@settings(max_examples=150, deadline=None)
@given(out=st.integers(1, 40), groups=st.integers(1, 12), dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(["unstructured", "nm", "dense", "zero_rows"]),
       ratio=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9, 0.99]),
       nm=st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 8)]), seed=st.integers(0, 2**16),
       native=st.booleans())
def test_round_trip_is_bit_exact(out, groups, dtype, kind, ratio, nm, seed, native):
    """Both gather paths: the native helper (where it was built) and the numpy fallback."""
    saved = compact._native
    if not native:
        compact._native = None
    try:
        _round_trip(out, groups, dtype, kind, ratio, nm, seed)
    finally:
        compact._native = saved


def _round_trip(out, groups, dtype, kind, ratio, nm, seed):
    n, m = nm
    cols = groups * m
    gen = torch.Generator().manual_seed(seed)
    keep = _keep_mask(kind, out, cols, ratio, n, m, gen)
    weight = (torch.randn(out, cols, generator=gen) * 3).to(dtype).masked_fill(~keep, 0.0)
    # Kept weights can be anything, including -0.0, +-inf and NaN: they must survive verbatim.
    weight.view(-1)[0] = -0.0 if keep.view(-1)[0] else weight.view(-1)[0]

    fits = compact.nm_fits(keep, n, m)
    # every encoder takes the mask as bool or packed (as the masks file holds it)
    for mask in (keep, compact.pack_bits(keep)):
        for enc in (compact.encode_bitmask(weight, mask),
                    compact.encode_nm(weight, mask, n, m) if fits else None,
                    compact.choose(weight, mask, (n, m))):
            if enc is None:
                continue
            back = compact.decode(enc.encoding, enc.parts, enc.shape, enc.n, enc.m)
            assert back.dtype == dtype and back.shape == weight.shape
            assert torch.equal(_bits(back), _bits(weight)), enc.encoding
            if enc.encoding == "bitmask":  # the stored mask is the pruning mask, bit for bit
                assert torch.equal(compact.unpack_bits(enc.parts["bitmask"], cols), keep)
            if enc.encoding == "nm":  # every kept weight has a slot, n slots per group
                slots = compact.nm_keep(enc.parts["indices"], (out, cols), n, m)
                assert bool((slots | ~keep).all())
                assert bool((slots.view(out, -1, m).sum(-1) == n).all())
        if not fits:  # a mask that is not N:M is refused, not encoded wrongly
            assert compact.choose(weight, mask, (n, m)).encoding != "nm"
            with pytest.raises(ValueError):
                compact.encode_nm(weight, mask, n, m)


def test_special_values_survive():
    w = torch.tensor([[float("nan"), 0.0, 0.0, -0.0, float("inf"), 0.0, -float("inf"), 0.0]])
    keep = torch.tensor([[True, False, False, True, True, False, True, False]])
    for enc in (compact.encode_bitmask(w, keep), compact.encode_nm(w, keep, 2, 4)):
        back = compact.decode(enc.encoding, enc.parts, enc.shape, enc.n, enc.m)
        assert torch.equal(_bits(back), _bits(w))


def test_nm_slots_hand_case():
    # Groups of 4 keep {1,3} and {0} (the second padded with the first pruned position, 1).
    w = torch.tensor([[0.0, 5.0, 0.0, 7.0, 9.0, 0.0, 0.0, 0.0]])
    keep = w != 0
    enc = compact.encode_nm(w, keep, 2, 4)
    assert enc.parts["values"].tolist() == [[5.0, 7.0, 9.0, 0.0]]
    # indices 1, 3, 0, 1 at 2 bits each, little-endian: 1 | 3<<2 | 0<<4 | 1<<6 = 77
    assert enc.parts["indices"].tolist() == [[77]]


def test_nm_hand_cases_from_packed_masks():
    # 1:4 over 16 inputs keeps positions 2, 0, 3, 1 of its groups: 2-bit indices, four a byte:
    # 2 | 0<<2 | 3<<4 | 1<<6 = 114
    w = torch.zeros(1, 16)
    for col in (2, 4, 11, 13):
        w[0, col] = col + 1.0
    enc = compact.encode_nm(w, compact.pack_bits(w != 0), 1, 4)
    assert enc.parts["values"].tolist() == [[3.0, 5.0, 12.0, 14.0]]
    assert enc.parts["indices"].tolist() == [[114]]
    # 4:8 keeping positions 1, 2, 5, 7: 4-bit indices, two a byte: 1 | 2<<4 = 33, 5 | 7<<4 = 117
    w = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 5.0, 0.0, 7.0]], dtype=torch.bfloat16)
    enc = compact.encode_nm(w, compact.pack_bits(w != 0), 4, 8)
    assert enc.parts["values"].tolist() == [[1.0, 2.0, 5.0, 7.0]]
    assert enc.parts["indices"].tolist() == [[33, 117]]
    # a group keeping 3 of 4 is not 2:4, whichever way the mask comes
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    assert compact.choose(w, compact.pack_bits(w != 0), (2, 4)).encoding != "nm"
    with pytest.raises(ValueError):
        compact.encode_nm(w, compact.pack_bits(w != 0), 2, 4)


def test_packed_mask_padding_bits_are_ignored():
    # 3 columns: the 5 padding bits of the mask byte are set, but they are no weight's
    w = torch.tensor([[1.0, 0.0, 2.0]])
    enc = compact.encode_bitmask(w, torch.tensor([[0b11111101]], dtype=torch.uint8))
    assert enc.parts["bitmask"].tolist() == [[0b101]]
    assert enc.parts["row_offsets"].tolist() == [0, 2]
    assert enc.parts["values"].tolist() == [1.0, 2.0]


def test_count_true_of_packed_masks():
    gen = torch.Generator().manual_seed(3)
    for cols in (8, 64, 13):
        keep = torch.rand(7, cols, generator=gen) < 0.4
        assert compact.count_true(compact.pack_bits(keep)) == int(keep.sum())


def test_bitmask_hand_case():
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    enc = compact.encode_bitmask(w, w != 0)
    assert enc.parts["values"].tolist() == [1.0, 2.0, 3.0]
    assert enc.parts["bitmask"].tolist() == [[0b101], [0], [0b010]]
    assert enc.parts["row_offsets"].tolist() == [0, 2, 2, 3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sizes_meet_the_budget(dtype):
    out, cols = 576, 1536
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out, cols, generator=gen).to(dtype)
    dense = w.numel() * w.element_size()

    # 2:4: values plus 2-bit indices = 0.5625 x dense, within 1%
    keep = _keep_mask("nm", out, cols, None, 2, 4, gen)
    enc = compact.choose(w * keep, keep, (2, 4))
    assert enc.encoding == "nm"
    assert enc.nbytes <= 0.5625 * dense * 1.01
    assert enc.nbytes == compact.nm_nbytes((out, cols), 2, 4, w.element_size())

    # 50% unstructured: values plus 1-bit mask = 0.5625 x dense, plus int32 row offsets
    keep = torch.rand(out, cols, generator=gen) >= 0.5
    keep[:, : cols // 2], keep[:, cols // 2:] = True, False  # exactly 50%
    enc = compact.choose(w * keep, keep, None)
    assert enc.encoding == "bitmask"
    assert enc.nbytes <= 0.5625 * dense + (out + 1) * 4


def test_too_dense_stays_plain():
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[0, 0] = False
    assert compact.choose(w, keep, None).encoding == "plain"
    assert compact.choose(w, None, None).encoding == "plain"


def test_nm_fits_rejects_an_overfull_group():
    keep = torch.tensor([[True, True, True, False, True, False, False, False]])
    assert not compact.nm_fits(keep, 2, 4)
    assert compact.nm_fits(keep, 3, 4)
    assert not compact.nm_fits(torch.ones(2, 6, dtype=torch.bool), 2, 4)  # 6 % 4 != 0


@pytest.mark.parametrize("m", [2, 4, 8, 16, 32])
def test_index_bits(m):
    b = compact.index_bits(m)
    assert 2**b >= m and 8 % b == 0 and b >= math.ceil(math.log2(m))


def test_large_m_uses_sort_path():
    gen = torch.Generator().manual_seed(1)
    keep = _keep_mask("nm", 8, 64, None, 5, 16, gen)
    w = torch.randn(8, 64, generator=gen) * keep
    enc = compact.encode_nm(w, keep, 5, 16)
    assert torch.equal(compact.decode("nm", enc.parts, enc.shape, 5, 16), w)


def test_2of4_index_bytes_for_every_valid_mask_byte():
    # all 36 mask bytes with two kept in each nibble: the index byte is the kept positions,
    # 2 bits each, low group first: p0 | p1 << 2 | q0 << 4 | q1 << 6
    import numpy as np

    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    masks, want = [], []
    for p0, p1 in pairs:
        for q0, q1 in pairs:
            masks.append((1 << p0 | 1 << p1) | (1 << q0 | 1 << q1) << 4)
            want.append(p0 | p1 << 2 | q0 << 4 | q1 << 6)
    got = compact._indices_2of4(np.array(masks, np.uint8))
    assert got.tolist() == want


@pytest.mark.skipif(compact._native is None, reason="the optional native helper is not built")
@pytest.mark.parametrize("np_dtype", ["int8", "int16", "int32", "int64"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 13), (17, 64), (64, 200), (5, 7)])
def test_native_gather_equals_numpy_compress(np_dtype, shape):
    """The C gather against numpy's compress on the unpacked mask (an independent computation),
    with the count of nonzero pruned positions against a direct count, for every element
    width, rows that end in a partial mask byte, and masks from empty to full."""
    import numpy as np

    rng = np.random.default_rng(sum(shape))
    out_f, cols = shape
    for density in (0.0, 0.3, 0.5, 1.0):
        keep = rng.random(shape) < density
        src = rng.integers(-50, 50, shape).astype(np_dtype)
        bits = np.packbits(keep, axis=-1, bitorder="little")
        want = np.compress(keep.ravel(), src.ravel())
        for four in (False, True):  # the 2:4 hint changes the copy, never the result
            got = np.full(want.size + 3, 99, np_dtype)  # room to spare: nothing past nnz
            written, stray = compact._native.gather_bits(src, bits, got, out_f, cols,
                                                         src.itemsize, four)
            assert written == want.size
            assert (got[:written] == want).all()
            assert stray == int(np.count_nonzero(src[~keep]))
        if want.size:  # too small an output is refused before anything is written
            with pytest.raises(ValueError, match="smaller"):
                compact._native.gather_bits(src, bits, np.empty(want.size - 1, np_dtype),
                                            out_f, cols, src.itemsize)


def test_select_bits_counts_nonzero_pruned_positions():
    """select_bits returns the kept values in row-major order and, with the native helper, the
    number of pruned positions that are not +0.0 (a -0.0 counts: it would not round-trip)."""
    keep = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]],
                        dtype=torch.bool)
    w = torch.tensor([[1.0, 0.0, 2.0, -0.0, 0, 0, 0, 5.0, 3.0, 4.0],
                      [0.0] * 9 + [6.0]], dtype=torch.bfloat16)
    values, stray = compact.select_bits(w, compact.pack_bits(keep).numpy())
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0, 6.0]
    if compact._native is not None:
        assert stray == 2  # the -0.0 and the 5.0
    else:
        assert stray is None
    assert not compact.pruned_are_zero(w, keep)


def test_native_helper_is_built_where_a_compiler_exists():
    """`pip install` builds llmprune/_native.c as an optional extension: where a C compiler is on
    the PATH a missing (or stale, see NATIVE_ABI) helper means the build went wrong, and compact
    exports would silently take the slower numpy path."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the numpy path is the expected one")
    assert compact._native is not None
    assert compact._native.ABI == compact.NATIVE_ABI
