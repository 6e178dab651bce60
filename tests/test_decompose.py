"""The engine: ``mpsdata.decompose``, the ``MPS`` it returns, and ``mpsdata.entanglement_entropy``.

Oracles are independent of the implementation: MPS contracted here with ``einsum``, singular values from
``torch.linalg.svdvals``, errors measured from the reconstruction. SVD signs are arbitrary, so results are
compared through reconstructions, never through cores.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpsdata
from mpsdata import _engine
from mpsdata._budget import max_bonds, min_ratio, num_params, tighten
from mpsdata._layout import Layout, make_layout

# sqrt(eps) * ||x||: the resolution of errors computed from Gram-matrix eigenvalues.
GRAM_RES = {torch.float32: 4 * math.sqrt(torch.finfo(torch.float32).eps), torch.float64: 4 * 1.5e-8}
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def _norms(x: torch.Tensor, image_dims: int = 2) -> torch.Tensor:
    return x.to(torch.float64).flatten(x.ndim - image_dims).norm(dim=-1)


def _measured_error(m: mpsdata.MPS, x: torch.Tensor) -> torch.Tensor:
    image_dims = m.layout.image_dims
    return _norms(m.reconstruct().to(torch.float64) - x.to(torch.float64), image_dims)


def _contract(cores: list[torch.Tensor]) -> torch.Tensor:
    """Contract cores ``(d, j, d')`` into the full site-order vector."""
    out = cores[0].reshape(cores[0].shape[1], -1)
    for core in cores[1:]:
        out = torch.einsum("ia,ajb->ijb", out, core).reshape(-1, core.shape[-1])
    return out.reshape(-1)


def _random_mps_images(layout: Layout, bonds, count: int, seed: int) -> torch.Tensor:
    """``count`` images, each an exact MPS of the given (tight) bonds on the layout's sites."""
    gen = torch.Generator().manual_seed(seed)
    full = [1, *bonds, 1]
    vectors = []
    for _ in range(count):
        cores = [
            torch.randn(full[k], j, full[k + 1], generator=gen, dtype=torch.float64)
            for k, j in enumerate(layout.site_dims)
        ]
        vectors.append(_contract(cores))
    return layout.from_sites(torch.stack(vectors))


def _unfolding_svdvals(sites: torch.Tensor, site_dims, k: int) -> torch.Tensor:
    """Singular values of the unfolding between site ``k`` and ``k + 1`` of site-order data ``(B, N)``."""
    left = math.prod(site_dims[: k + 1])
    return torch.linalg.svdvals(sites.to(torch.float64).reshape(sites.shape[0], left, -1))


def _entropy_reference(sites: torch.Tensor, site_dims) -> torch.Tensor:
    out = []
    for k in range(len(site_dims) - 1):
        s2 = _unfolding_svdvals(sites, site_dims, k).square()
        v = s2 / s2.sum(-1, keepdim=True)
        out.append(-torch.where(v > 0, v * v.log(), 0).sum(-1))
    return torch.stack(out, -1)


# ---------------------------------------------------------------------------------------------------
# Oracle: a known MPS is recovered.
ORACLE_CASES = [
    (28, 28, [2, 4, 7, 7, 2], (2, 3, 3, 2)),
    (16, 16, [4, 4, 4, 4], (3, 5, 2)),
    (28, 28, [(7, 7), (2, 2), (2, 2)], (5, 3)),
    (12, 20, [(3, 5), (2, 2), (2, 2)], (4, 4)),
    (10, 15, [10, 15], (4,)),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("height", "width", "site_dims", "bonds"), ORACLE_CASES)
def test_oracle_recovers_a_known_mps(height, width, site_dims, bonds, dtype, seed) -> None:
    layout = make_layout(height, width, site_dims=site_dims)
    assert tighten(bonds, layout.site_dims) == bonds
    x = _random_mps_images(layout, bonds, 4, seed).to(dtype)
    for budget in ({"bond_dims": list(bonds)}, {"max_bond": 64}):
        m = mpsdata.decompose(x, site_dims=site_dims, **budget)
        assert m.dtype == dtype
        relative = _measured_error(m, x) / _norms(x)
        assert float(relative.max()) < (1e-10 if dtype == torch.float64 else 1e-4), budget
        cores = m.cores
        assert cores[0].shape[-3] == 1 and cores[-1].shape[-1] == 1  # end bonds
        for k, bond in enumerate(m.bond_dims):
            left, right = math.prod(m.site_dims[: k + 1]), math.prod(m.site_dims[k + 1 :])
            assert bond <= min(left, right)
            assert cores[k].shape[-1] == bond == cores[k + 1].shape[-3]
        assert all(c.shape[-2] == j for c, j in zip(cores, m.site_dims, strict=True))
    # With exactly the known bonds, every image uses them all.
    m = mpsdata.decompose(x, bond_dims=list(bonds), site_dims=site_dims)
    assert m.bond_dims == bonds
    assert torch.equal(m.ranks, torch.tensor(bonds).expand(4, 1, len(bonds)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("site_dims", [None, "row", [4, 196], [28, 28], [2, 2, 7, 2, 2, 7]])
def test_full_bonds_reconstruct_to_float_precision(site_dims, dtype) -> None:
    x = torch.rand(6, 28, 28, generator=torch.Generator().manual_seed(3), dtype=dtype)
    m = mpsdata.decompose(x, max_bond=10**6, site_dims=site_dims)
    assert m.bond_dims == max_bonds(m.site_dims)
    eps = torch.finfo(dtype).eps
    assert float((_measured_error(m, x) / _norms(x)).max()) < 100 * eps
    assert float((m.error / _norms(x)).max()) <= GRAM_RES[dtype]


# ---------------------------------------------------------------------------------------------------
# Truncation errors and Theorem 1.
def _check_theorem_1(m: mpsdata.MPS, x: torch.Tensor) -> None:
    dtype = m.dtype
    measured = _measured_error(m, x)
    norms = _norms(x, m.layout.image_dims)
    slack = GRAM_RES[dtype] * norms
    assert bool((measured <= m.error_bound * (1 + RTOL[dtype]) + slack).all()), (measured, m.error_bound)
    # m.error is the exact error, not a bound.
    assert torch.allclose(m.error.to(torch.float64), measured, rtol=RTOL[dtype], atol=float(slack.max()))
    # The bound is the root of the sum of squares of the last term's truncation errors.
    last = m.truncation_errors[..., -1, :].to(torch.float64)
    assert torch.allclose(m.error_bound.to(torch.float64), last.square().sum(-1).sqrt(), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("residual", [0, 1, 2])
@pytest.mark.parametrize("site_dims", [None, "row", [28, 28], [4, 7, 28], [(7, 7), (4, 4)]])
def test_theorem_1_on_random_images(site_dims, residual, dtype) -> None:
    x = torch.rand(8, 28, 28, generator=torch.Generator().manual_seed(residual), dtype=dtype)
    m = mpsdata.decompose(x, ratio=0.7, residual=residual, site_dims=site_dims)
    assert m.terms == residual + 1
    assert bool((m.error > 0).all())  # a real truncation, so the bound is tested
    _check_theorem_1(m, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("ratio", "residual"), [(0.2, 0), (0.4, 0), (0.6, 1), (0.7, 2)])
@pytest.mark.parametrize("site_dims", [None, "row", [28, 28], [(7, 7), (4, 4)]])
def test_theorem_1_on_fashion_mnist(fashion_images, site_dims, ratio, residual, dtype) -> None:
    m = mpsdata.decompose(fashion_images, ratio=ratio, residual=residual, site_dims=site_dims, dtype=dtype)
    assert m.reconstruct().shape == fashion_images.shape
    assert bool((m.ratio <= ratio).all())
    _check_theorem_1(m, fashion_images)


@pytest.mark.parametrize("site_dims", ["row", "hierarchical", [28, 28]])
def test_first_term_truncation_errors_are_definition_1(site_dims) -> None:
    # eps_k: the root of the sum of the squared singular values beyond d_k of the k-th unfolding of the image.
    x = torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    m = mpsdata.decompose(x, ratio=0.5, residual=1, site_dims=site_dims)
    sites = m.layout.to_sites(x)
    for k, bond in enumerate(m.bond_dims):
        expected = _unfolding_svdvals(sites, m.site_dims, k)[:, bond:].square().sum(-1).sqrt()
        assert torch.allclose(m.truncation_errors[:, 0, k], expected, rtol=1e-6, atol=1e-6)


def test_error_equals_measured_on_fashion_mnist(fashion_images) -> None:
    for dtype in (torch.float32, torch.float64):
        for budget in ({"ratio": 0.4}, {"ratio": 0.5, "residual": 1}, {"tol": 0.15}, {"max_bond": 3}):
            m = mpsdata.decompose(fashion_images, dtype=dtype, site_dims="hierarchical", **budget)
            measured = _measured_error(m, fashion_images)
            assert torch.allclose(m.error.to(torch.float64), measured, rtol=RTOL[dtype], atol=0), (dtype, budget)


def test_compute_bound_false_changes_nothing_but_the_bound() -> None:
    x = torch.rand(9, 28, 28, generator=torch.Generator().manual_seed(1))
    with_bound = mpsdata.decompose(x, ratio=0.5, residual=1)
    without = mpsdata.decompose(x, ratio=0.5, residual=1, compute_bound=False)
    assert torch.equal(with_bound.reconstruct(), without.reconstruct())
    assert torch.equal(with_bound.error, without.error)
    with pytest.raises(ValueError, match="compute_bound"):
        _ = without.error_bound
    with pytest.raises(ValueError, match="compute_bound"):
        _ = without.truncation_errors


# ---------------------------------------------------------------------------------------------------
# Budgets as decompose sees them.
@pytest.mark.parametrize("residual", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.45, 0.8, 1.0])
@pytest.mark.parametrize(("height", "width", "site_dims"), [(28, 28, None), (28, 28, "row"), (29, 31, None)])
def test_ratio_never_exceeds_the_request(height, width, site_dims, ratio, residual) -> None:
    x = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    layout = make_layout(height, width, site_dims=site_dims)
    if ratio < min_ratio(layout.site_dims, layout.num_values, residual + 1):
        with pytest.raises(ValueError, match="too small"):
            mpsdata.decompose(x, ratio=ratio, residual=residual, site_dims=site_dims)
        return
    m = mpsdata.decompose(x, ratio=ratio, residual=residual, site_dims=site_dims)
    params = (residual + 1) * num_params(m.bond_dims, m.site_dims)
    assert bool((m.ratio <= ratio).all())
    assert torch.allclose(m.ratio, torch.full((3,), params / (height * width), dtype=torch.float64))
    assert m.ratio.dtype == torch.float64
    assert torch.equal(m.nbytes, torch.full((3,), params * 4))
    assert sum(c[0].numel() for c in m.cores) == params  # the cores hold exactly what the ratio counts


def test_max_bond_and_bond_dims_are_caps() -> None:
    x = torch.rand(4, 28, 28, generator=torch.Generator().manual_seed(0))
    m = mpsdata.decompose(x, max_bond=3, site_dims="row")
    assert m.bond_dims == (2, 3, 3, 2)  # the end bonds cannot exceed their site
    m = mpsdata.decompose(x, bond_dims=[9, 1, 9, 9], site_dims="row")
    assert m.bond_dims == tighten([9, 1, 9, 9], m.site_dims)
    m = mpsdata.decompose(x, bond_dims=[9, 5, 9, 9], max_bond=4, site_dims="row")
    assert max(m.bond_dims) <= 4


# ---------------------------------------------------------------------------------------------------
# Tolerance mode.
@pytest.mark.parametrize("tol", [0.05, 0.15, 0.3])
def test_tol_bounds_the_error_and_ranks_vary(fashion_images, tol) -> None:
    x = fashion_images[:128]
    for dtype in (torch.float64, torch.float32):
        m = mpsdata.decompose(x, tol=tol, dtype=dtype, site_dims="hierarchical")  # two bonds, as below
        norms = _norms(x)
        measured = _measured_error(m, x)
        assert bool((measured <= tol * norms * (1 + RTOL[dtype]) + GRAM_RES[dtype] * norms).all())
        assert bool((m.error <= tol * norms * (1 + RTOL[dtype])).all())
        ranks = m.ranks[:, 0]
        assert len({tuple(r) for r in ranks.tolist()}) > 1  # each image stops at its own rank
        assert m.ratio.unique().numel() > 1
        assert m.bond_dims == tuple(ranks.amax(0).tolist())  # stored bonds: the largest any image uses
    # A looser tolerance never needs more parameters (a theorem for these two bonds: the looser first-bond
    # subspace is nested in the tighter one, so the second unfolding's tail can only shrink).
    tight = mpsdata.decompose(x, tol=tol / 2, dtype=torch.float64, site_dims="hierarchical")
    loose = mpsdata.decompose(x, tol=tol, dtype=torch.float64, site_dims="hierarchical")
    assert len(loose.bond_dims) == 2
    assert bool((loose.ratio <= tight.ratio).all())


def test_tol_with_caps() -> None:
    x = torch.rand(10, 28, 28, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m = mpsdata.decompose(x, tol=0.01, max_bond=3)
    assert bool((m.ranks <= 3).all())
    m0 = mpsdata.decompose(x, tol=0.0, max_bond=3)
    assert torch.equal(m0.reconstruct(), mpsdata.decompose(x, max_bond=3).reconstruct())


def test_tol_on_an_exact_low_rank_image_finds_the_rank() -> None:
    layout = make_layout(16, 16, site_dims=[4, 4, 4, 4])
    x = _random_mps_images(layout, (2, 3, 2), 3, seed=5)
    m = mpsdata.decompose(x, tol=1e-6, site_dims=[4, 4, 4, 4])
    assert m.bond_dims == (2, 3, 2)
    assert float((_measured_error(m, x) / _norms(x)).max()) < 1e-6


# ---------------------------------------------------------------------------------------------------
# Entanglement entropy.
def test_entropy_of_a_constant_image_is_zero() -> None:
    x = torch.full((2, 16, 16), 7.0)
    for site_dims in ([2] * 8, [4, 4, 4, 4], [16, 16], "hierarchical"):
        assert float(mpsdata.entanglement_entropy(x, site_dims).abs().max()) < 1e-10
        m = mpsdata.decompose(x, max_bond=2, site_dims=site_dims)
        assert float(m.entanglement_entropy().abs().max()) < 1e-6
    assert torch.equal(mpsdata.entanglement_entropy(torch.zeros(8, 8), [8, 8]), torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("size", [2, 6, 8])
def test_entropy_of_a_checkerboard_on_two_sites_is_ln_2(size: int) -> None:
    checker = ((torch.arange(size)[:, None] + torch.arange(size)) % 2).to(torch.uint8) * 200
    e = mpsdata.entanglement_entropy(checker, site_dims=[size, size])
    assert e.shape == (1,) and e.dtype == torch.float64
    assert float(e) == pytest.approx(math.log(2), abs=1e-12)
    m = mpsdata.decompose(checker, max_bond=2, site_dims=[size, size])
    assert float(m.entanglement_entropy()) == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("site_dims", ["row", "hierarchical", [4, 7, 28]])
def test_entropy_matches_the_singular_values(site_dims) -> None:
    x = torch.rand(3, 2, 28, 28, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    e = mpsdata.entanglement_entropy(x, site_dims)
    layout = make_layout(28, 28, site_dims=site_dims)
    assert e.shape == (3, 2, layout.num_sites - 1)
    expected = _entropy_reference(layout.to_sites(x).reshape(6, -1), layout.site_dims)
    assert torch.allclose(e.reshape(6, -1), expected, atol=1e-10)
    # Full bonds keep the whole state, so the stored entropy is the image's.
    m = mpsdata.decompose(x, max_bond=10**6, site_dims=site_dims)
    assert torch.allclose(m.entanglement_entropy(), e, atol=1e-6)


@pytest.mark.parametrize(
    "budget", [{"ratio": 0.3}, {"ratio": 0.6, "residual": 1}, {"ratio": 0.8, "residual": 2}, {"tol": 0.2}]
)
def test_stored_entropy_is_at_most_ln_of_the_bond(fashion_images, budget) -> None:
    """On the whole site grid: the stored state, padding included, has at most ``terms * d_k`` Schmidt values."""
    x = fashion_images[:64]
    for site_dims in ("row", "hierarchical"):
        m = mpsdata.decompose(x, site_dims=site_dims, **budget)
        e = m.entanglement_entropy()
        assert e.shape == (64, len(m.site_dims) - 1)
        bonds = torch.tensor(m.bond_dims, dtype=torch.float64)
        assert bool((e <= torch.log(m.terms * bonds) + 1e-6).all())
        # Sharper: the rank of a sum of terms is at most the sum of their ranks.
        assert bool((e <= torch.log(m.ranks.sum(-2).to(torch.float64)) + 1e-6).all())
        assert bool((e >= -1e-9).all())


@pytest.mark.parametrize(("height", "width", "kwargs"), [(29, 31, {"max_bond": 1}), (1, 17, {"ratio": 1.0})])
def test_stored_entropy_of_a_padded_layout_is_that_of_the_state(height, width, kwargs) -> None:
    """Padded layouts: the entropy is of the MPS on its whole grid. Cropping to the image and padding again by
    copying edge pixels made a different state, with entropy above ln(bond) (0.002 on a rank-1 bond of 1x17)."""
    x = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = mpsdata.decompose(x, site_dims="row", **kwargs)
    assert math.prod(m.site_dims) > height * width  # padded
    bonds = torch.tensor(m.bond_dims, dtype=torch.float64)
    e = m.entanglement_entropy()
    assert bool((e <= torch.log(bonds) + 1e-9).all()), (e, m.bond_dims)
    assert bool((e[..., bonds == 1].abs() < 1e-9).all())


# ---------------------------------------------------------------------------------------------------
# Backends: numba CPU kernels and batched torch.linalg compute the same thing.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("terms", "tol"), [(1, 0.0), (2, 0.0), (3, 0.0), (1, 0.05), (1, 0.2)])
@pytest.mark.parametrize(
    ("height", "width", "site_dims", "ratio"),
    [(28, 28, "hierarchical", 0.4), (28, 28, "row", 0.5), (40, 40, [40, 40], 0.5), (29, 31, None, 0.5)],
)
def test_numba_and_torch_backends_agree(height, width, site_dims, ratio, terms, tol, dtype) -> None:
    layout = make_layout(height, width, site_dims=site_dims)
    # Random-walk images have decaying spectra like real ones; on white noise nearly equal singular values make
    # the truncation of later residual terms depend on rounding, so any two correct backends may differ there.
    noise = torch.rand(70, height, width, generator=torch.Generator().manual_seed(terms), dtype=torch.float64)
    x = (noise - 0.5).cumsum(-1).cumsum(-2).reshape(70, -1) * 10
    if tol > 0:
        bonds = max_bonds(layout.site_dims)
    else:
        bonds = mpsdata._budget.bonds_for_ratio(layout.site_dims, ratio, layout.num_values, terms)
    results = {}
    for backend in ("numba", "torch"):
        packed = _engine.encode(
            x, layout.gather_index, layout.site_dims, bonds, tol=tol, terms=terms, dtype=dtype, backend=backend
        )
        flat = _engine.decode(packed.cores, layout.scatter_index, layout.site_dims, bonds, backend=backend)
        assert packed.cores.dtype == dtype and flat.dtype == dtype
        results[backend] = (packed, flat.to(torch.float64))
    (pn, rn), (pt, rt) = results["numba"], results["torch"]
    norm2 = x.square().sum(1)
    # Both solve Gram eigenproblems: in float32 a kept singular value below sqrt(eps) * sigma_1 has a vector
    # resolved only to that level (measured up to 2.5e-3 relative on the 40x40 matrix), its weight far better.
    rtol_image = 1e-9 if dtype == torch.float64 else 4e-3
    rtol_weight = 1e-9 if dtype == torch.float64 else 1e-5
    assert torch.equal(pn.ranks, pt.ranks)
    assert float(((rn - rt).norm(dim=1) / norm2.sqrt()).max()) <= rtol_image
    assert float(((pn.eps2 - pt.eps2).abs().sum(-1) / norm2[:, None]).max()) <= rtol_weight
    assert float(((pn.tails - pt.tails).abs().sum(-1) / norm2[:, None]).max()) <= rtol_weight


def test_numba_and_torch_contraction_agree() -> None:
    layout = make_layout(28, 28, site_dims="row")
    bonds = (2, 6, 5, 2)
    x = torch.rand(20, 784, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    cores = _engine.encode(x, layout.gather_index, layout.site_dims, bonds, terms=2, dtype=torch.float64).cores
    for quantize in (False, True):
        a = _engine.decode(cores, layout.scatter_index, layout.site_dims, bonds, quantize=quantize, backend="numba")
        b = _engine.decode(cores, layout.scatter_index, layout.site_dims, bonds, quantize=quantize, backend="torch")
        assert a.dtype == b.dtype == (torch.uint8 if quantize else torch.float64)
        assert float((a.double() - b.double()).abs().max()) <= (1 if quantize else 1e-9)


def test_encode_rejects_bonds_that_are_not_tight() -> None:
    layout = make_layout(28, 28, site_dims="row")
    with pytest.raises(ValueError, match="tight"):
        _engine.encode(torch.rand(2, 784), layout.gather_index, layout.site_dims, (2, 9, 5, 2))


# ---------------------------------------------------------------------------------------------------
# Batches, dtypes, containers.
@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratio": 0.4},
        {"tol": 0.2},
        {"ratio": 0.7, "residual": 2, "site_dims": "row"},
        {"max_bond": 5, "dtype": torch.float64},
    ],
)
def test_batched_equals_unbatched_exactly(kwargs) -> None:
    # 600 images: several lane blocks and, with 2+ threads, several thread chunks.
    x = torch.randint(0, 256, (600, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    m = mpsdata.decompose(x, **kwargs)
    batch = m.reconstruct()
    for i in (0, 1, 63, 64, 65, 299, 300, 301, 599):
        alone = mpsdata.decompose(x[i], **kwargs)
        assert torch.equal(alone.reconstruct(), batch[i]), i
        assert torch.equal(alone.error, m.error[i])
        assert torch.equal(alone.ranks, m.ranks[i])
    # Other companions in the batch change nothing either.
    pair = mpsdata.decompose(x[[300, 5]], **kwargs).reconstruct()
    assert torch.equal(pair[0], batch[300]) and torch.equal(pair[1], batch[5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_equals_unbatched_on_degenerate_images(dtype) -> None:
    """Blank, flat, rank-one and mirrored images (repeated and rounding-level eigenvalues: the eigensolver's
    completion and LAPACK fallback paths) come out the same bits alone and in any batch."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (40, 28, 28), generator=g).float()
    ramp = torch.linspace(0, 255, 28)
    special = [
        torch.zeros(28, 28),
        torch.full((28, 28), 255.0),
        torch.outer(ramp, ramp) / 255,  # rank one
        torch.cat([noise[0, :14], noise[0, :14].flip(0)]),  # mirrored halves: paired singular values
        torch.eye(28) * 100,  # a multiple of the identity
    ]
    x = torch.cat([torch.stack(special), noise]).round()
    x = x[torch.randperm(len(x), generator=g)]
    for kwargs in ({"ratio": 0.4}, {"max_bond": 6, "site_dims": [2, 4, 7, 7, 2]}, {"tol": 0.1}):
        m = mpsdata.decompose(x, dtype=dtype, **kwargs)
        batch = m.reconstruct()
        for i in range(len(x)):
            alone = mpsdata.decompose(x[i], dtype=dtype, **kwargs)
            assert torch.equal(alone.reconstruct(), batch[i]), (kwargs, i)
            assert torch.equal(alone.error, m.error[i]), (kwargs, i)
        assert torch.isfinite(batch).all()
        exact = (batch.double() - x.double()).flatten(1).norm(dim=1)
        # The error comes from Gram eigenvalues: good to about sqrt(eps) * ||x|| (documented on MPS.error).
        slack = 4 * torch.finfo(dtype).eps ** 0.5 * x.flatten(1).double().norm(dim=1) + 1e-9
        assert bool(((m.error.double() - exact).abs() <= slack).all()), kwargs


def _plain_ttsvd_error(sites: torch.Tensor, site_dims, bonds) -> torch.Tensor:
    """Relative error of a plain TT-SVD (``torch.linalg.svd`` at every bond, float64) of site-order ``(B, N)``."""
    flat = sites.to(torch.float64)
    B, rest = flat.shape
    cores, carry, left = [], flat, 1
    for j, r in zip(site_dims[:-1], bonds, strict=True):
        u, s, vh = torch.linalg.svd(carry.reshape(B, left * j, rest // j), full_matrices=False)
        cores.append(u[..., :r])
        carry = s[:, :r, None] * vh[:, :r]
        left, rest = r, rest // j
    out = carry
    for u in reversed(cores):
        out = (u @ out.reshape(B, u.shape[-1], -1)).reshape(B, -1)
    return (out - flat).norm(dim=1) / flat.norm(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_equals_plain_ttsvd_on_binary_shapes(dtype) -> None:
    """Images of a few filled rectangles: exact arithmetic gives Gram matrices whose tridiagonal forms have
    eigenvectors with (near) zero entries inside, where a twisted solve passes through a tiny entry next to
    a pivot clamped at pivmin and must keep it (cutting it lost a whole eigenvector: errors up to 0.21
    where a plain TT-SVD has 1e-15)."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2048, 32, 32)
    for image in x:
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            r0, c0 = torch.randint(0, 32, (2,), generator=g).tolist()
            r1 = int(torch.randint(r0, 33, (), generator=g))
            c1 = int(torch.randint(c0, 33, (), generator=g))
            image[r0:r1, c0:c1] = 1.0
    x = x[x.flatten(1).amax(1) > 0]
    site_dims, bonds = [4, 4, 4, 4, 4], [4, 6, 6, 4]
    m = mpsdata.decompose(x, bond_dims=bonds, site_dims=site_dims, dtype=dtype)
    ours = _measured_error(m, x) / _norms(x)
    plain = _plain_ttsvd_error(m.layout.to_sites(x), site_dims, bonds)
    slack = 1e-9 if dtype == torch.float64 else GRAM_RES[dtype]
    assert float((ours - plain).max()) <= slack


def test_batched_equals_unbatched_with_a_colour_site() -> None:
    x = torch.rand(70, 3, 12, 20, generator=torch.Generator().manual_seed(0))
    m = mpsdata.decompose(x, ratio=0.5, channel_mode="site")
    assert m.site_dims[-1] == 3 and m.batch_shape == (70,)
    assert m.reconstruct().shape == x.shape
    params = num_params(m.bond_dims, m.site_dims)
    assert torch.allclose(m.ratio, torch.tensor(params / (3 * 12 * 20), dtype=torch.float64))
    for i in (0, 64, 69):
        assert torch.equal(mpsdata.decompose(x[i], ratio=0.5, channel_mode="site").reconstruct(), m.reconstruct()[i])
    _check_theorem_1(m, x)


def test_separate_channels_are_batch_dims() -> None:
    x = torch.rand(4, 3, 12, 20, generator=torch.Generator().manual_seed(0))
    m = mpsdata.decompose(x, ratio=0.5)
    assert m.batch_shape == (4, 3)
    assert torch.equal(m.reconstruct()[2, 1], mpsdata.decompose(x[2, 1], ratio=0.5).reconstruct())


def test_dtypes_and_scales() -> None:
    gen = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (5, 28, 28), generator=gen, dtype=torch.uint8)
    f32 = u8.float()
    m_u8, m_f32 = mpsdata.decompose(u8, ratio=0.4), mpsdata.decompose(f32, ratio=0.4)
    assert m_u8.dtype == torch.float32 and m_u8.reconstruct().dtype == torch.float32
    assert torch.equal(m_u8.reconstruct(), m_f32.reconstruct())  # uint8 input keeps its 0..255 scale
    # uint8 output: rounded and clamped in one pass.
    expected = m_u8.reconstruct().add(0.5).floor().clamp(0, 255).to(torch.uint8)
    assert torch.equal(m_u8.reconstruct(torch.uint8), expected)
    # float16 and bfloat16 input compute in float32, as exactly as the float32 input they convert to.
    half = (f32 / 255).half()
    assert mpsdata.decompose(half, ratio=0.4).dtype == torch.float32
    assert torch.equal(
        mpsdata.decompose(half, ratio=0.4).reconstruct(), mpsdata.decompose(half.float(), ratio=0.4).reconstruct()
    )
    bf = (f32 / 255).bfloat16()
    assert torch.equal(
        mpsdata.decompose(bf, ratio=0.4).reconstruct(), mpsdata.decompose(bf.float(), ratio=0.4).reconstruct()
    )
    # float64 input, or dtype=float64, computes in float64.
    assert mpsdata.decompose(f32.double(), ratio=0.4).dtype == torch.float64
    m64 = mpsdata.decompose(u8, ratio=0.4, dtype=torch.float64)
    assert m64.dtype == torch.float64 and m64.reconstruct().dtype == torch.float64
    assert torch.allclose(m64.reconstruct(), m_u8.reconstruct().double(), atol=1e-2)
    with pytest.raises(TypeError, match="None or torch.uint8"):
        m_u8.reconstruct(torch.float16)


def test_numpy_input_equals_tensor_input() -> None:
    rng = np.random.default_rng(0)
    for array in (rng.random((4, 28, 28)), rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)):
        a = mpsdata.decompose(array, ratio=0.4).reconstruct()
        b = mpsdata.decompose(torch.from_numpy(array), ratio=0.4).reconstruct()
        assert torch.equal(a, b)
    strided = rng.random((28, 56))[:, ::2]  # not contiguous
    assert torch.equal(
        mpsdata.decompose(strided, ratio=0.4).reconstruct(),
        mpsdata.decompose(torch.from_numpy(strided.copy()), ratio=0.4).reconstruct(),
    )


@pytest.mark.parametrize("kwargs", [{"ratio": 0.4}, {"tol": 0.1}, {"ratio": 0.6, "residual": 1}])
def test_empty_batch(kwargs) -> None:
    for x, mode in ((torch.rand(0, 28, 28), "separate"), (torch.rand(2, 0, 28, 28), "separate")):
        m = mpsdata.decompose(x, channel_mode=mode, **kwargs)
        assert m.reconstruct().shape == x.shape
        assert m.reconstruct(torch.uint8).shape == x.shape
        for name in ("ratio", "error", "error_bound", "nbytes"):
            assert getattr(m, name).shape == x.shape[:-2], name
        assert m.ranks.shape == (*x.shape[:-2], m.terms, len(m.site_dims) - 1)
        assert m.truncation_errors.shape == m.ranks.shape
        assert [c.shape[: x.ndim - 1] for c in m.cores] == [(*x.shape[:-2], m.terms)] * len(m.site_dims)
        assert m.entanglement_entropy().shape == (*x.shape[:-2], len(m.site_dims) - 1)
    m = mpsdata.decompose(torch.rand(0, 3, 12, 20), channel_mode="site", **kwargs)
    assert m.reconstruct().shape == (0, 3, 12, 20)


def test_indexing() -> None:
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    m = mpsdata.decompose(x, tol=0.2)
    full = m.reconstruct()
    for index in (1, (1, 2), (slice(None), slice(1, None)), (0, [2, 0]), torch.tensor([1, 0])):
        sub = m[index]
        assert torch.equal(sub.reconstruct(), full[index])
        assert sub.batch_shape == full[index].shape[:-2]
        for name in ("ratio", "error", "error_bound", "ranks", "truncation_errors", "nbytes"):
            assert torch.equal(getattr(sub, name), getattr(m, name)[index]), name
    assert m.batch_shape == (2, 3)
    with pytest.raises(IndexError, match="single image"):
        m[1, 2][0]


def test_mps_to_same_device_and_repr() -> None:
    m = mpsdata.decompose(torch.rand(3, 28, 28), ratio=0.4, site_dims="hierarchical")
    moved = m.to("cpu")
    assert moved.device == torch.device("cpu")
    assert torch.equal(moved.reconstruct(), m.reconstruct())
    text = repr(m)
    assert "batch_shape=(3,)" in text and f"bond_dims={m.bond_dims}" in text and "hierarchical" in text


# ---------------------------------------------------------------------------------------------------
# Property test over sizes, layouts and budgets.
layouts = st.sampled_from([None, "row", "hierarchical", "matrix"])
budgets = st.one_of(
    st.fixed_dictionaries({"ratio": st.floats(0.05, 1.0), "residual": st.integers(0, 2)}),
    st.fixed_dictionaries({"max_bond": st.integers(1, 12)}),
    st.fixed_dictionaries({"tol": st.floats(0.0, 0.5), "residual": st.integers(0, 1)}),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 40), st.integers(2, 40), layouts, budgets, st.integers(0, 2**31 - 1))
def test_property_sizes_layouts_budgets(height, width, family, budget, seed) -> None:
    site_dims = [height, width] if family == "matrix" else family
    x = torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    layout = make_layout(height, width, site_dims=site_dims)
    terms = budget.get("residual", 0) + 1
    # A parameter budget (ratio * values / terms) within 1e-9 of a whole count is that count: rounding in
    # the ratio (0.9999999999999999 for a 2x2 image's 1.0) does not make it too small.
    smallest = min_ratio(layout.site_dims, layout.num_values, terms)
    if "ratio" in budget and budget["ratio"] * layout.num_values / terms + 1e-9 < smallest * layout.num_values / terms:
        with pytest.raises(ValueError, match="too small"):
            mpsdata.decompose(x, site_dims=site_dims, **budget)
        return
    m = mpsdata.decompose(x, site_dims=site_dims, **budget)
    assert m.reconstruct().shape == x.shape and m.site_dims == layout.site_dims
    assert m.cores[0].shape[-3] == 1 and m.cores[-1].shape[-1] == 1
    assert all(b <= c for b, c in zip(m.bond_dims, max_bonds(m.site_dims), strict=True))
    assert bool((m.ranks <= torch.tensor(m.bond_dims)).all())
    if "ratio" in budget:
        assert bool((m.ratio <= budget["ratio"] + 1e-12).all())
    if "max_bond" in budget:
        assert max(m.bond_dims) <= budget["max_bond"]
    norms = _norms(x)
    if "tol" in budget:
        assert bool(
            (_measured_error(m, x) <= budget["tol"] * norms * (1 + 1e-9) + GRAM_RES[torch.float64] * norms).all()
        )
    if (layout.padded_height, layout.padded_width) == (height, width):
        _check_theorem_1(m, x)
    else:  # see test_error_is_exact_with_padding
        assert bool((_measured_error(m, x) <= m.error_bound * (1 + 1e-9) + GRAM_RES[torch.float64] * norms).all())


@pytest.mark.parametrize("site_dims", ["row", "hierarchical"])
@pytest.mark.parametrize(("height", "width"), [(29, 31), (2, 17)])
def test_error_is_exact_with_padding(height, width, site_dims) -> None:
    # Padded pixels are copies: the error of the image, not of the padded tensor, is what m.error promises.
    x = torch.rand(4, height, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = mpsdata.decompose(x, max_bond=2, site_dims=site_dims)
    assert (m.layout.padded_height, m.layout.padded_width) != (height, width)
    assert torch.allclose(m.error, _measured_error(m, x), rtol=1e-9)


@pytest.mark.parametrize("site_dims", ["row", "hierarchical"])
def test_tol_is_relative_to_the_image_not_the_padding(site_dims) -> None:
    # Bright last row and column: padding copies them, so the padded tensor's norm is far above the image's. A
    # tolerance taken from the padded norm let the image's error exceed tol (0.0505-0.0526 for tol 0.05).
    x = torch.rand(8, 31, 31, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, -1, :] += 20.0
    x[:, :, -1] += 20.0
    m = mpsdata.decompose(x, tol=0.05, site_dims=site_dims)
    assert (m.layout.padded_height, m.layout.padded_width) == (32, 32)
    assert bool((_measured_error(m, x) <= 0.05 * _norms(x)).all())
    layout = m.layout
    bonds = tighten(max_bonds(layout.site_dims), layout.site_dims)
    flat = x.reshape(8, -1)
    numba = _engine.encode(flat, layout.gather_index, layout.site_dims, bonds, tol=0.05, dtype=torch.float64)
    torch_ = _engine.encode(
        flat, layout.gather_index, layout.site_dims, bonds, tol=0.05, dtype=torch.float64, backend="torch"
    )
    assert torch.equal(numba.ranks, torch_.ranks)  # both backends take the image's norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("site_dims", "tol"), [([28, 28], 0.1), ([28, 28], 0.01), ("hierarchical", 0.2)])
def test_tol_on_real_images_matches_the_torch_backend(fashion_images, site_dims, tol, dtype) -> None:
    """Under ``tol`` the kernels compute only the eigenpairs an image needs (one past the rank its eigenvalues
    give), not all of the largest bonds'; real images, whose blank borders give many zero eigenvalues, get the
    ranks and errors of the torch backend, which computes them all."""
    layout = make_layout(28, 28, site_dims=site_dims)
    bonds = max_bonds(layout.site_dims)
    x = fashion_images.reshape(len(fashion_images), -1).to(dtype)
    numba = _engine.encode(x, layout.gather_index, layout.site_dims, bonds, tol=tol, dtype=dtype)
    torch_ = _engine.encode(x, layout.gather_index, layout.site_dims, bonds, tol=tol, dtype=dtype, backend="torch")
    if dtype == torch.float64:
        assert torch.equal(numba.ranks, torch_.ranks)
    else:  # a discarded weight within float32 rounding of delta**2 may tip a rank either way (1 of 512 here)
        apart = (numba.ranks - torch_.ranks).abs()
        assert int(apart.max()) <= 1 and int((apart > 0).sum()) <= len(x) // 100
    same = (numba.ranks == torch_.ranks).flatten(1).all(1)
    norm2 = x.double().square().sum(1)
    weight = 1e-9 if dtype == torch.float64 else 1e-5
    gap = (numba.eps2 - torch_.eps2).double().abs().sum(-1).flatten() / norm2
    assert float(gap[same].max()) <= weight
    assert int(numba.ranks.amax()) < max(bonds)  # the case this is about: far fewer pairs than the caps


# ---------------------------------------------------------------------------------------------------
@pytest.mark.needs_cuda
@pytest.mark.parametrize("kwargs", [{"ratio": 0.4}, {"tol": 0.1}, {"ratio": 0.6, "residual": 1, "site_dims": "row"}])
def test_cuda_matches_cpu(kwargs) -> None:
    x = torch.rand(100, 28, 28, generator=torch.Generator().manual_seed(0))
    cpu = mpsdata.decompose(x, **kwargs)
    gpu = mpsdata.decompose(x.cuda(), **kwargs)
    assert gpu.device.type == "cuda" and gpu.bond_dims == cpu.bond_dims
    image = gpu.reconstruct()
    assert image.device.type == "cuda" and image.dtype == torch.float32 and image.shape == x.shape
    assert torch.allclose(image.cpu(), cpu.reconstruct(), atol=1e-3)
    assert (gpu.reconstruct(torch.uint8).cpu().int() - cpu.reconstruct(torch.uint8).int()).abs().max() <= 1
    assert torch.equal(gpu.ranks.cpu(), cpu.ranks)
    assert torch.allclose(gpu.error.cpu(), cpu.error, rtol=1e-3)
    assert torch.allclose(gpu.error_bound.cpu(), cpu.error_bound, rtol=1e-3)
    moved = cpu.to("cuda")
    assert moved.device.type == "cuda"
    assert torch.allclose(moved.reconstruct().cpu(), cpu.reconstruct(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Bad input: the right exception, and a message that names what was wrong.
X = torch.rand(2, 28, 28)


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        (X.clone().index_fill_(1, torch.tensor([3]), float("nan")), {"ratio": 0.4}, ValueError, "NaN or infinite"),
        (X.clone().index_fill_(2, torch.tensor([3]), float("inf")), {"ratio": 0.4}, ValueError, "NaN or infinite"),
        (torch.rand(28), {"ratio": 0.4}, ValueError, r"\(\.\.\., H, W\).*\(28,\)"),
        (torch.rand(28, 28), {"ratio": 0.4, "channel_mode": "site"}, ValueError, r"\(\.\.\., C, H, W\)"),
        (X, {"ratio": 0.0}, ValueError, r"ratio must be in \(0, 1\], got 0"),
        (X, {"ratio": 1.5}, ValueError, r"ratio must be in \(0, 1\], got 1.5"),
        (X, {"ratio": -0.2}, ValueError, r"ratio must be in \(0, 1\]"),
        (X, {"ratio": float("nan")}, ValueError, r"ratio must be in \(0, 1\]"),
        (X, {"ratio": 0.01, "site_dims": "hierarchical"}, ValueError, r"(?s)too small.*0\.0727"),
        (X, {"ratio": 0.15, "residual": 2}, ValueError, "3 term"),
        (X, {"ratio": 0.4, "bond_dims": [2, 2]}, ValueError, "either ratio or bond_dims"),
        (X, {"ratio": 0.4, "tol": 0.1}, ValueError, "either ratio"),
        (X, {}, ValueError, "give a budget"),
        (X, {"residual": 1}, ValueError, "give a budget"),
        (
            X,
            {"bond_dims": [2, 2, 2], "site_dims": "hierarchical"},
            ValueError,
            r"(?s)2 for site dims \[49, 4, 4\].*got 3",
        ),
        (X, {"bond_dims": [2, 0]}, ValueError, "bond dimension must be >= 1"),
        (X, {"bond_dims": "22"}, TypeError, "bond_dims must be a sequence"),
        (X, {"bond_dims": [2, 2.5]}, TypeError, "bond dimension must be an int"),
        (X, {"max_bond": 0}, ValueError, "max_bond must be >= 1"),
        (X, {"max_bond": 2.0}, TypeError, "max_bond must be an int"),
        (X, {"tol": -0.1}, ValueError, "tol must be >= 0"),
        (X, {"tol": "0.1"}, TypeError, "tol must be a number"),
        (X, {"ratio": "0.4"}, TypeError, "ratio must be a number"),
        (X, {"ratio": 0.4, "residual": -1}, ValueError, "residual must be >= 0"),
        (X, {"ratio": 0.4, "residual": 1.0}, TypeError, "residual must be an int"),
        (X, {"ratio": 0.4, "site_dims": [2, 4, 7, 7]}, ValueError, r"(?s)392.*784"),
        (X, {"ratio": 0.4, "site_dims": [(7, 7), (2, 2)]}, ValueError, r"(?s)14x14.*28x28"),
        (X, {"ratio": 0.4, "site_dims": 784}, TypeError, "site_dims"),
        (X, {"ratio": 0.4, "dtype": torch.float16}, TypeError, "float32 or torch.float64, got torch.float16"),
        (X, {"ratio": 0.4, "channel_mode": "rgb"}, ValueError, "channel_mode must be"),
        (torch.zeros(2, 28, 28, dtype=torch.int64), {"ratio": 0.4}, TypeError, "uint8 or floating point.*int64"),
        (torch.zeros(2, 28, 28, dtype=torch.bool), {"ratio": 0.4}, TypeError, "uint8 or floating point.*bool"),
        (np.zeros((2, 28, 28), np.int32), {"ratio": 0.4}, TypeError, "uint8 or floating point.*int32"),
        (PIL.Image.new("L", (28, 28)), {"ratio": 0.4}, TypeError, "got Image.*MPSCompress"),
        ([[0.0, 1.0], [1.0, 0.0]], {"ratio": 0.4}, TypeError, "got list"),
        (torch.rand(1, 5), {"max_bond": 2}, ValueError, "2 sites"),
        (torch.rand(3, 1, 1), {"ratio": 0.5}, ValueError, "1x1 image is too small for an MPS"),
        (torch.rand(0, 28, 28), {"ratio": 0.4, "channel_mode": "site"}, ValueError, "no channels.*C >= 1"),
        (X * 1e18, {"ratio": 0.4}, ValueError, r"(?s)up to [\d.]+e\+1[78]: .*float32.*scale the images down.*float64"),
        (X.double() * 1e153, {"ratio": 0.4}, ValueError, r"(?s)float64.*overflow.*scale the images down"),
        (X * 1e-25, {"tol": 0.1}, ValueError, r"(?s)largest value is [\d.]+e-2[56]: .*underflow.*scale the images up"),
        (X.double() * 1e-140, {"ratio": 0.4}, ValueError, r"(?s)float64.*underflow"),
    ],
)
def test_bad_input(x, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        mpsdata.decompose(x, **kwargs)


def test_error_messages_do_not_print_tensor_contents() -> None:
    x = torch.full((2, 28, 28), 0.123456)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError) as info:
        mpsdata.decompose(x, ratio=0.4)
    assert "0.1234" not in str(info.value) and "(2, 28, 28)" in str(info.value)


@pytest.mark.parametrize(("dtype", "scales"), [(torch.float32, (1e-11, 1e16)), (torch.float64, (1e-130, 1e150))])
def test_extreme_scales_inside_the_range_scale_the_result(dtype, scales) -> None:
    """Where the scale check lets images through, the MPS scales with them: same ranks, same relative error,
    and Theorem 1 holds (beyond it squares over- or underflow, and decompose says so: test_bad_input)."""
    x = torch.rand(4, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    base = mpsdata.decompose(x, tol=0.1)
    for scale in scales:
        m = mpsdata.decompose(x * scale, tol=0.1)
        assert torch.equal(m.ranks, base.ranks), scale
        relative = m.error / (x * scale).flatten(1).norm(dim=1)
        assert torch.allclose(relative, base.error / x.flatten(1).norm(dim=1), rtol=1e-3), scale
        assert bool((m.error <= m.error_bound * 1.001).all()), scale


def test_zero_image_passes_the_scale_check() -> None:
    m = mpsdata.decompose(torch.zeros(2, 28, 28), ratio=0.4)
    assert float(m.reconstruct().abs().max()) == 0.0 and float(m.error_bound.max()) == 0.0


def test_autograd_and_read_only_inputs() -> None:
    """A tensor that requires grad is read as data (nothing to differentiate through an SVD truncation), and a
    read-only numpy array is copied rather than shared (torch warns on non-writable memory)."""
    x = torch.rand(2, 28, 28, requires_grad=True)
    m = mpsdata.decompose(x, ratio=0.4)
    assert torch.equal(m.reconstruct(), mpsdata.decompose(x.detach(), ratio=0.4).reconstruct())
    assert not m.reconstruct().requires_grad
    assert mpsdata.entanglement_entropy(x).shape == (2, 1)
    array = x.detach().numpy().copy()
    array.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(mpsdata.decompose(array, ratio=0.4).reconstruct(), m.reconstruct())


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_residual_terms_under_tol_are_held_to_the_image_norm(backend) -> None:
    """tol is relative to the image for every term: once the first term meets it, later terms stay at the
    smallest ranks (each used to be held to its own, smaller residual and grew to full bonds)."""
    grid = torch.linspace(0, 1, 28, dtype=torch.float64)
    smooth = torch.sin(6 * grid[:, None]) * torch.cos(4 * grid[None])
    x = smooth + 0.05 * torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layout = make_layout(28, 28, site_dims="row")
    bonds = tighten([28] * (len(layout.site_dims) - 1), layout.site_dims)
    flat = x.reshape(3, -1)
    one = _engine.encode(flat, layout.gather_index, layout.site_dims, bonds, tol=0.2, backend=backend)
    three = _engine.encode(flat, layout.gather_index, layout.site_dims, bonds, tol=0.2, terms=3, backend=backend)
    assert torch.equal(three.ranks[:, 0], one.ranks[:, 0])
    norm2 = flat.square().sum(1)
    assert bool((three.eps2[:, 0].sum(-1) <= 0.2**2 * norm2).all())  # the first term already meets tol
    assert bool((three.ranks[:, 1:] == 1).all())  # so the residual terms keep rank 1
    assert bool((three.eps2[:, 1:] <= 0.2**2 * norm2[:, None, None] / len(bonds) * (1 + 1e-9)).all())
    m = mpsdata.decompose(x, tol=0.2, residual=2, site_dims="row")
    assert bool((m.ratio < 0.2).all())  # 2.71 at 2f7f152 on one such image: full-rank residual terms


def test_entanglement_entropy_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        mpsdata.entanglement_entropy(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), [2, 2])
    with pytest.raises(ValueError, match="at least 2 dims"):
        mpsdata.entanglement_entropy(torch.rand(4), [2, 2])
    with pytest.raises(TypeError, match="uint8 or floating point"):
        mpsdata.entanglement_entropy(torch.ones(4, 4, dtype=torch.int32), [4, 4])
    with pytest.raises(ValueError, match="overflow"):
        mpsdata.entanglement_entropy(torch.rand(4, 4, dtype=torch.float64) * 1e160, [4, 4])
    with pytest.raises(ValueError, match="no channels"):
        mpsdata.entanglement_entropy(torch.rand(2, 0, 4, 4), [4, 4], channel_mode="site")


# ---------------------------------------------------------------------------------------------------
# Byte budgets and storage schemes (issue: compression that is real in bytes)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([(8, 8, None), (8, 8, [8, 8]), (12, 10, "row"), (16, 16, "hierarchical")]),
    st.floats(0.05, 1.5),
    st.sampled_from(["float32", "float16", "int8", "int4"]),
    st.integers(0, 1),
)
def test_bytes_ratio_is_never_exceeded(shape, bytes_ratio: float, core_dtype: str, residual: int) -> None:
    h, w, sites = shape
    x = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    try:
        m = mpsdata.decompose(x, bytes_ratio=bytes_ratio, core_dtype=core_dtype, residual=residual, site_dims=sites)
    except ValueError as error:
        assert "too small" in str(error)
        return
    budget = math.floor(bytes_ratio * h * w + 1e-9)
    assert m.nbytes.shape == (3,) and int(m.nbytes.max()) <= budget
    assert m.core_dtype == core_dtype
    # nbytes counts the stored scheme: values and scales of every term
    from mpsdata import _quant

    assert int(m.nbytes[0]) == _quant.nbytes_per_image(m.site_dims, m.bond_dims, residual + 1, core_dtype)


@pytest.mark.parametrize("core_dtype", ["float16", "int8", "int4"])
def test_core_dtype_rounds_the_cores_and_error_is_measured(core_dtype: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(4, 16, 16, generator=g) * 255).round()
    exact = mpsdata.decompose(x, bond_dims=[4], site_dims=[16, 16], dtype=torch.float64)
    rounded = mpsdata.decompose(x, bond_dims=[4], site_dims=[16, 16], dtype=torch.float64, core_dtype=core_dtype)
    assert not torch.equal(rounded.reconstruct(), exact.reconstruct())
    assert torch.allclose(rounded.error, _measured_error(rounded, x), rtol=1e-9)
    rel = (rounded.reconstruct() - exact.reconstruct()).flatten(1).norm(dim=1) / _norms(x)
    assert float(rel.max()) < {"float16": 1e-3, "int8": 2e-2, "int4": 0.2}[core_dtype]
    assert int(rounded.nbytes[0]) < int(exact.nbytes[0])  # float64 math cores count 8 bytes a value


def test_int8_cores_survive_indexing_and_moves() -> None:
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 255
    m = mpsdata.decompose(x, bytes_ratio=0.6, site_dims=[8, 8])
    assert m.core_dtype == "int8" and m._quantized.values.shape[0] == 6
    part = m[1]
    assert part.core_dtype == "int8" and part._quantized.values.shape[0] == 3
    assert torch.equal(part._quantized.dequantize().to(m.dtype), part._packed)
    assert torch.equal(part.reconstruct(), m.reconstruct()[1])
    assert part.nbytes.tolist() == m.nbytes[1].tolist()
    assert m.to("cpu").core_dtype == "int8"
    assert "core_dtype='int8'" in repr(m)


def test_default_nbytes_counts_the_math_dtype() -> None:
    x = torch.rand(2, 8, 8)
    m = mpsdata.decompose(x, bond_dims=[2], site_dims=[8, 8])
    assert m.core_dtype == "float32" and m.nbytes.tolist() == [4 * 32] * 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bytes_ratio": 0.3, "ratio": 0.3}, ValueError, "either ratio or bytes_ratio"),
        ({"bytes_ratio": 0.3, "bond_dims": [2]}, ValueError, "either bytes_ratio or bond_dims"),
        ({"bytes_ratio": -1.0}, ValueError, "positive and finite"),
        ({"bytes_ratio": float("nan")}, ValueError, "positive and finite"),
        ({"bytes_ratio": True}, TypeError, "bytes_ratio must be a number"),
        ({"bytes_ratio": 0.001}, ValueError, "too small for any int8 MPS"),
        ({"ratio": 0.3, "core_dtype": "int2"}, ValueError, "core_dtype must be one of"),
        ({"ratio": 0.3, "core_dtype": torch.int8}, TypeError, "core_dtype must be a string"),
    ],
)
def test_byte_budget_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        mpsdata.decompose(torch.rand(2, 8, 8), site_dims=[8, 8], **kwargs)


def test_auto_site_dims_picks_the_best_layout_on_the_sample() -> None:
    from mpsdata import _quant

    g = torch.Generator().manual_seed(3)
    rows = torch.rand(40, 16, 1, generator=g) * torch.rand(40, 1, 16, generator=g) * 200  # rank-1 images
    x = (rows + torch.rand(40, 16, 16, generator=g) * 20).round().to(torch.uint8)
    for budget in ({"ratio": 0.3}, {"bytes_ratio": 0.3}):
        auto = mpsdata.decompose(x, site_dims="auto", **budget)
        found = _quant.search_layout(
            x, 4 * 0.3 if "ratio" in budget else 0.3, "float32" if "ratio" in budget else "int8",
        )  # fmt: skip
        assert (auto.site_dims, auto.domain) == (found["best"]["layout"], found["best"]["domain"])
        assert auto.search["best"]["psnr"] == pytest.approx(found["best"]["psnr"], abs=1e-9)
        psnr = {}
        for name, m in (("auto", auto), ("default", mpsdata.decompose(x, **budget))):
            mse = (m.reconstruct(torch.uint8).double() - x.double()).square().flatten(1).mean(1)
            psnr[name] = float((10 * torch.log10(255**2 / mse.clamp_min(1e-10))).mean())
        assert psnr["auto"] >= psnr["default"] - 1e-9  # the default layout is among the candidates


def test_auto_site_dims_errors() -> None:
    with pytest.raises(ValueError, match="auto.*ratio or bytes_ratio"):
        mpsdata.decompose(torch.rand(2, 8, 8), bond_dims=[2], site_dims="auto")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        mpsdata.decompose(torch.rand(2, 4, 8, 8), ratio=0.5, site_dims="auto", channel_mode="site")
    rgb = mpsdata.decompose(torch.rand(2, 3, 8, 8), ratio=0.5, site_dims="auto", channel_mode="site")
    assert rgb.layout.channel_site and rgb.reconstruct().shape == (2, 3, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_values_are_found_anywhere(dtype) -> None:
    from mpsdata._mps import _all_finite

    x = torch.rand(7, 28, 28).to(dtype)
    assert _all_finite(x) and _all_finite(x[:0]) and _all_finite(torch.zeros(3, dtype=torch.uint8))
    for value in (float("nan"), float("inf"), float("-inf")):
        for index in ((0, 0, 0), (3, 14, 9), (6, 27, 27)):
            bad = x.clone()
            bad[index] = value
            assert not _all_finite(bad), (value, index)
    with pytest.raises(ValueError, match="NaN or infinite"):
        mpsdata.decompose(torch.full((2, 8, 8), float("-inf"), dtype=dtype), ratio=0.5)
