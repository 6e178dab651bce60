"""Budgets: from a compression ratio or explicit limits to the bond dimensions of an MPS.

The paper's compression ratio of an MPS with site dims ``j_k`` and bonds ``d_k`` (``d_0 = d_n = 1``) is
``rho = sum_k d_{k-1} j_k d_k / prod_k j_k``. We divide by the values of the *original* image (before any
padding), so the ratio is what a user saves, and count every residual term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["max_bonds", "tighten", "num_params", "bonds_for_ratio", "min_ratio"]


def max_bonds(site_dims: Sequence[int]) -> tuple[int, ...]:
    """Largest useful bond of every cut: ``min(prod(left dims), prod(right dims))`` (paper Eq. 1).

    Example:
        >>> max_bonds([2, 4, 7, 7, 2])
        (2, 8, 14, 2)
    """
    total = math.prod(site_dims)
    left, bonds = 1, []
    for j in site_dims[:-1]:
        left *= j
        bonds.append(min(left, total // left))
    return tuple(bonds)


def tighten(bonds: Sequence[int], site_dims: Sequence[int]) -> tuple[int, ...]:
    """Clip bonds so none exceeds what its neighbours can carry.

    A bond larger than ``d_{k-1} j_k`` or ``j_{k+1} d_{k+1}`` only stores parameters that the truncated
    SVD fills with zeros; clipping it changes nothing in the reconstruction and keeps the ratio honest.

    Example:
        >>> tighten([64, 64, 64, 64], [2, 4, 7, 7, 2])
        (2, 8, 14, 2)
        >>> tighten([2, 8, 1, 2], [2, 4, 7, 7, 2])
        (2, 7, 1, 2)
    """
    d = [1] + [max(1, min(int(b), m)) for b, m in zip(bonds, max_bonds(site_dims), strict=False)] + [1]
    changed = True
    while changed:
        changed = False
        for k in range(1, len(d) - 1):
            limit = min(d[k - 1] * site_dims[k - 1], site_dims[k] * d[k + 1])
            if d[k] > limit:
                d[k], changed = limit, True
    return tuple(d[1:-1])


def num_params(bonds: Sequence[int], site_dims: Sequence[int]) -> int:
    """Parameters of one MPS term: ``sum_k d_{k-1} j_k d_k``.

    Example:
        >>> num_params([2, 6, 5, 2], [2, 4, 7, 7, 2])
        336
    """
    d = [1, *bonds, 1]
    return sum(d[k] * j * d[k + 1] for k, j in enumerate(site_dims))


def min_ratio(site_dims: Sequence[int], num_values: int, terms: int = 1) -> float:
    """Smallest ratio any MPS on these sites reaches (every bond 1)."""
    return terms * sum(site_dims) / num_values


def bonds_for_ratio(site_dims: Sequence[int], ratio: float, num_values: int, terms: int = 1) -> tuple[int, ...]:
    """Bond dimensions whose parameter count, over ``terms`` MPS terms, never exceeds ``ratio``.

    The bonds grow one step at a time, always the smallest bond first (the middle breaks ties), while the
    budget allows; the result depends only on the sites and the budget, never on the data, so a batch and
    each of its images get the same bonds.

    Args:
        site_dims: Site dimensions.
        ratio: Target parameter ratio in ``(0, 1]``.
        num_values: Values of the original image (the ratio's denominator).
        terms: Number of MPS terms sharing the budget (1 + residual terms).

    Returns:
        The bond dimensions, tight (see :func:`tighten`).

    Raises:
        ValueError: ``ratio`` is below :func:`min_ratio`.

    Example:
        >>> bonds_for_ratio([2, 4, 7, 7, 2], 0.4, 784)
        (2, 5, 5, 2)
    """
    budget = math.floor(ratio * num_values / terms + 1e-9)
    bonds = [1] * (len(site_dims) - 1)
    if num_params(bonds, site_dims) > budget:
        raise ValueError(
            f"ratio {ratio} is too small for any MPS on site dims {list(site_dims)} with {terms} term(s): "
            f"the smallest (every bond 1) needs ratio >= {min_ratio(site_dims, num_values, terms):.4f}; "
            "raise the ratio, use fewer residual terms, or use fewer, larger sites"
        )
    limits = max_bonds(site_dims)
    middle = (len(bonds) - 1) / 2
    while True:
        order = sorted(range(len(bonds)), key=lambda k: (bonds[k], abs(k - middle), k))
        for k in order:
            if bonds[k] >= limits[k]:
                continue
            trial = bonds.copy()
            trial[k] += 1
            if tighten(trial, site_dims) != tuple(trial):
                continue  # a neighbour must grow first
            if num_params(trial, site_dims) <= budget:
                bonds = trial
                break
        else:
            return tuple(bonds)
