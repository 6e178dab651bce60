"""Budgets: from a ratio or explicit limits to bond dimensions (``mpsdata._budget``).

Exact bond lists are left to the module's doctests (the allocation rule may change); these tests check the
invariants every allocation must keep.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpsdata._budget import bonds_for_ratio, max_bonds, min_ratio, num_params, tighten

site_lists = st.lists(st.integers(2, 9), min_size=2, max_size=6)


def _is_tight(bonds, sites) -> bool:
    d = [1, *bonds, 1]
    return all(d[k] <= min(d[k - 1] * sites[k - 1], sites[k] * d[k + 1]) for k in range(1, len(d) - 1))


@pytest.mark.parametrize(
    ("sites", "expected"),
    [
        ([2, 4, 7, 7, 2], (2, 8, 14, 2)),
        ([4, 4, 4, 4, 4], (4, 16, 16, 4)),
        ([49, 4, 4], (16, 4)),
        ([5, 7], (5,)),
        ([7, 8, 16, 8, 7], (7, 56, 56, 7)),
    ],
)
def test_max_bonds_known(sites: list[int], expected: tuple[int, ...]) -> None:
    assert max_bonds(sites) == expected


@given(site_lists)
def test_max_bonds_is_min_of_left_and_right_products(sites: list[int]) -> None:
    bonds = max_bonds(sites)
    assert len(bonds) == len(sites) - 1
    for k, d in enumerate(bonds):
        assert d == min(math.prod(sites[: k + 1]), math.prod(sites[k + 1 :]))


def test_tighten_known() -> None:
    assert tighten([1, 10, 1], [2, 3, 3, 2]) == (1, 3, 1)  # the middle bond is held by its rank-1 neighbours
    assert tighten([100, 100], [49, 4, 4]) == (16, 4)
    assert tighten([3, 3], [49, 4, 4]) == (3, 3)
    assert tighten([0, 5], [4, 4, 4]) == (1, 4)  # bonds are at least 1


@given(site_lists, st.data())
def test_tighten_invariants(sites: list[int], data: st.DataObject) -> None:
    bonds = data.draw(st.lists(st.integers(1, 300), min_size=len(sites) - 1, max_size=len(sites) - 1))
    tight = tighten(bonds, sites)
    assert _is_tight(tight, sites)
    assert all(1 <= t <= min(b, m) for t, b, m in zip(tight, bonds, max_bonds(sites), strict=True))
    assert tighten(tight, sites) == tight  # idempotent
    assert num_params(tight, sites) <= num_params(bonds, sites)
    assert tighten(max_bonds(sites), sites) == max_bonds(sites)


def test_num_params_known() -> None:
    sites = [2, 4, 7, 7, 2]
    assert num_params([1, 1, 1, 1], sites) == sum(sites)
    assert num_params([2, 8, 14, 2], sites) == 2 * 2 + 2 * 4 * 8 + 8 * 7 * 14 + 14 * 7 * 2 + 2 * 2
    assert num_params([4], [5, 7]) == 4 * (5 + 7)  # rank-4 SVD of a 5x7 matrix


@given(st.integers(2, 40), st.integers(2, 40))
def test_two_sites_full_bond_is_the_matrix_rank(m: int, n: int) -> None:
    # Two sites are a matrix: the full bond is min(m, n) and its factors hold min(m, n) * (m + n) numbers.
    assert max_bonds([m, n]) == (min(m, n),)
    assert num_params(max_bonds([m, n]), [m, n]) == min(m, n) * (m + n)


def test_min_ratio_known() -> None:
    assert min_ratio([2, 4, 7, 7, 2], 784) == pytest.approx(22 / 784)
    assert min_ratio([2, 4, 7, 7, 2], 784, terms=3) == pytest.approx(66 / 784)


@settings(max_examples=150, deadline=None)
@given(site_lists, st.floats(0.0, 1.0), st.integers(1, 3))
def test_bonds_for_ratio_never_exceeds_the_ratio(sites: list[int], fraction: float, terms: int) -> None:
    values = math.prod(sites)
    low = min_ratio(sites, values, terms)
    if low > 1:
        with pytest.raises(ValueError, match="too small"):
            bonds_for_ratio(sites, 1.0, values, terms)
        return
    ratio = low + fraction * (1 - low)
    bonds = bonds_for_ratio(sites, ratio, values, terms)
    assert len(bonds) == len(sites) - 1
    assert terms * num_params(bonds, sites) <= ratio * values * (1 + 1e-12)
    assert tighten(bonds, sites) == bonds
    assert all(1 <= b <= m for b, m in zip(bonds, max_bonds(sites), strict=True))
    # The budget is used: no bond can grow by one (staying tight) and still fit.
    for k in range(len(bonds)):
        trial = list(bonds)
        trial[k] += 1
        if trial[k] <= max_bonds(sites)[k] and _is_tight(trial, sites):
            assert terms * num_params(trial, sites) > ratio * values, (bonds, k)


@settings(max_examples=150, deadline=None)
@given(site_lists, st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(1, 2))
def test_more_ratio_never_gives_fewer_params(sites: list[int], a: float, b: float, terms: int) -> None:
    values = math.prod(sites)
    low = min_ratio(sites, values, terms)
    if low > 1:
        return
    small, large = sorted([low + a * (1 - low), low + b * (1 - low)])
    p_small = num_params(bonds_for_ratio(sites, small, values, terms), sites)
    p_large = num_params(bonds_for_ratio(sites, large, values, terms), sites)
    assert p_small <= p_large


def test_ratio_one_on_two_sites_is_the_full_rank() -> None:
    # Two sites: the MPS is a matrix SVD, a full rank costs r * (m + n) >= m * n, so ratio 1 stops below it.
    bonds = bonds_for_ratio([5, 7], 1.0, 35)
    assert num_params(bonds, [5, 7]) <= 35 and num_params([bonds[0] + 1], [5, 7]) > 35


def test_ratio_below_min_ratio() -> None:
    sites = [2, 4, 7, 7, 2]
    low = min_ratio(sites, 784)
    assert bonds_for_ratio(sites, low, 784) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match=rf"(?s)too small.*{low:.4f}"):
        bonds_for_ratio(sites, low * 0.99, 784)
    with pytest.raises(ValueError, match="2 term"):
        bonds_for_ratio(sites, low * 1.5, 784, terms=2)


def test_ratio_counts_the_original_values() -> None:
    # Padded 29x31 -> 30x32: the denominator is the 899 real pixels, not the 960 padded ones.
    sites = [3, 4, 5, 4, 4]
    bonds = bonds_for_ratio(sites, 0.3, 29 * 31)
    assert num_params(bonds, sites) <= 0.3 * 29 * 31
