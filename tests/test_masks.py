import pytest
import torch

from llmprune.core.errors import PatternError, UserError
from llmprune.core.masks import lowest_k_mask, nm_mask, nm_violations, unstructured_mask
from llmprune.core.sparsity import Sparsity, check_divisible


def test_parse_unstructured_and_nm():
    assert Sparsity.parse(0.5, None) == Sparsity("unstructured", 0.5)
    s = Sparsity.parse(None, "2:4")
    assert (s.kind, s.n, s.m, s.ratio) == ("nm", 2, 4, 0.5)
    assert Sparsity.parse(None, " 4 : 8 ").label == "4:8"
    assert Sparsity.parse(0.5, "2:4").ratio == 0.5


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "2:2", "a:b", "2:4:8", "2:"])
def test_malformed_patterns(pattern):
    with pytest.raises(PatternError, match="--pattern"):
        Sparsity.parse(None, pattern)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(ratio):
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        Sparsity.parse(ratio, None)


def test_contradicting_sparsity_and_pattern():
    with pytest.raises(UserError, match="contradicts"):
        Sparsity.parse(0.3, "2:4")


def test_nm_mask_hand_case():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    keep = nm_mask(scores, 2, 4)  # True = kept: the 2 largest of each 4
    assert keep.tolist() == [[True, False, True, False, False, True, True, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_exact_per_group(n, m):
    torch.manual_seed(0)
    scores = torch.rand(17, 5 * m)
    keep = nm_mask(scores, n, m)
    kept = keep.view(17, 5, m).sum(-1)
    assert (kept == n).all()
    # The kept ones are the largest of each group.
    g = scores.view(17, 5, m)
    km = keep.view(17, 5, m)
    assert (g[km].view(17, 5, n).min(-1).values >= g[~km].view(17, 5, m - n).max(-1).values).all()
    assert nm_violations(scores.masked_fill(~keep, 0), n, m) == 0
    assert nm_violations(scores, n, m) == 17 * 5


def test_unstructured_per_row_and_global():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert unstructured_mask(scores, 0.5, per_row=True).tolist() == [  # True = kept
        [False, False, True, True], [False, False, True, True]]
    assert unstructured_mask(scores, 0.5, per_row=False).tolist() == [
        [False, False, False, False], [True, True, True, True]]
    assert unstructured_mask(scores, 0.0, per_row=True).all()


def test_check_divisible():
    check_divisible("x", 576, Sparsity.parse(None, "2:4"))
    with pytest.raises(PatternError, match="does not divide the input width 576"):
        check_divisible("x", 576, Sparsity.parse(None, "5:7"))


def test_lowest_k_exact_with_ties():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    from llmprune.core.masks import lowest_k_mask

    mask = lowest_k_mask(scores, 3, dim=1)
    assert mask.sum(1).tolist() == [3, 3]
    assert mask[0, 4] and not mask[0, 5]
    flat = lowest_k_mask(torch.zeros(10), 4, dim=0)
    assert int(flat.sum()) == 4
    torch.manual_seed(0)
    s = torch.rand(50, 40)
    ref = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(13, 1, largest=False).indices,
                                                          True)
    assert torch.equal(lowest_k_mask(s, 13, dim=1), ref)


def test_old_import_paths_are_deprecated_re_exports():
    import importlib
    import sys

    from llmprune.core import errors, masks, sparsity
    from llmprune.deprecated import MOVED
    from llmprune.io import checkpoints
    from llmprune.retrain import perp

    for old, new, names in [("llmprune.masks", sparsity, ["Sparsity", "check_divisible"]),
                            ("llmprune.masks", masks, ["nm_mask", "lowest_k_mask"]),
                            ("llmprune.errors", errors, ["UserError", "PatternError"]),
                            ("llmprune.export", checkpoints, ["export_checkpoint"])]:
        sys.modules.pop(old, None)  # imported anew through the finder
        mod = importlib.import_module(old)
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; import from"):
            assert all(getattr(mod, n) is getattr(new, n) for n in names)
    for old, targets in MOVED.items():  # every old path imports, and names a module that exists
        assert importlib.import_module(old).__name__ == old
        for target in targets:
            importlib.import_module(target)
    import llmprune
    from llmprune.perp import PerpConfig

    assert PerpConfig is perp.PerpConfig
    assert callable(llmprune.perp)  # the function, not the old module of that name

def _python_lowest_k(values: list[float], k: int) -> list[bool]:
    """The k smallest of a list, ties to the earlier position, by a plain Python sort."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    chosen = set(order[:k])
    return [i in chosen for i in range(len(values))]


@pytest.mark.parametrize("m", [2, 4, 5, 8, 9])
def test_lowest_k_mask_short_slices_match_a_python_sort(m):
    g = torch.Generator().manual_seed(m)
    for ties in (False, True):
        s = (torch.randint(0, 3, (6, 7, m), generator=g).float() if ties
             else torch.randn(6, 7, m, generator=g))
        for k in range(1, m):
            got = lowest_k_mask(s, k, dim=2)
            want = torch.tensor([[_python_lowest_k(s[a, b].tolist(), k) for b in range(7)]
                                 for a in range(6)])
            assert torch.equal(got, want), (m, k, ties)


@pytest.mark.parametrize("ties", [False, True])
def test_lowest_k_mask_long_slice_matches_a_python_sort(ties):
    g = torch.Generator().manual_seed(3)
    n = 70_001  # above the size where the sampled bracket is used
    s = (torch.randint(0, 40, (n,), generator=g).float() if ties
         else torch.randn(n, generator=g) ** 3)
    for k in (1, 17, n // 3, n // 2, n - 5, n - 1):
        got = lowest_k_mask(s, k, dim=0)
        assert int(got.sum()) == k
        assert got.tolist() == _python_lowest_k(s.tolist(), k), k
