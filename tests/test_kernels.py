"""The lane-parallel symmetric eigensolver behind the TT-SVD kernels, against LAPACK."""

from __future__ import annotations

import numpy as np
import pytest

from mpsdata import _kernels


def _solve_top(mats: np.ndarray, cap: int, fill: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run ``_kernels._eigh_top_lanes`` on ``mats`` ``(L, n, n)`` with every scratch array set to ``fill``.

    Returns the top ``cap`` eigenvalues ``(L, cap)`` (descending), their vectors ``(L, n, cap)``, the
    traces ``(L,)`` and which lanes went to LAPACK; checks the Rayleigh quotients against the vectors.
    """
    lanes, n, _ = mats.shape
    dtype = mats.dtype
    G = np.ascontiguousarray(mats.transpose(1, 2, 0))
    before = G.copy()
    scratch = _kernels._eig_scratch(G, cap)
    junk = {"f": fill, "i": -1 if fill else 0, "b": bool(fill)}  # what a NaN fill means for each kind
    for array in scratch:
        array.fill(junk[array.dtype.kind])
    fail = scratch[5]
    want, Vs, sv, total, rq = scratch[7:]
    delta2 = np.full(lanes, fill, dtype)
    _kernels._eigh_top_lanes(G, n, cap, False, delta2, scratch)
    assert np.all(want == cap)
    assert np.array_equal(G, before)  # the input is not changed
    vecs = Vs.transpose(2, 0, 1).astype(np.float64)
    quotients = np.einsum("lpa,lpq,lqa->la", vecs, mats.astype(np.float64), vecs)
    scale = np.abs(mats.astype(np.float64)).sum((1, 2))[:, None] + np.finfo(np.float64).tiny
    symmetric = np.array([np.array_equal(a, a.T) for a in mats])  # some neighbour lanes are junk on purpose
    assert np.all((np.abs(rq.T - quotients) <= 20 * n * np.finfo(dtype).eps * scale)[symmetric])
    return sv.T.copy(), Vs.transpose(2, 0, 1).copy(), total, fail


def _grouped(n: int) -> np.ndarray:
    """Rank-3 Gram matrix of a nearly flat image patch: three groups of identical rows (a real case)."""
    group = np.minimum(np.arange(n) * 3 // max(n, 1), 2)
    table = np.array([[171.0, 172.0, 173.0], [172.0, 174.0, 175.0], [173.0, 175.0, 178.0]])
    return table[group][:, group]


def _hard_cases(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    b = rng.normal(size=(n, n))
    q = np.linalg.qr(b)[0]
    low = rng.normal(size=(n, 2))
    block = np.zeros((n, n))
    block[: n // 2, : n // 2] = (b @ b.T)[: n // 2, : n // 2]
    return [
        b @ b.T,  # generic Gram matrix
        np.zeros((n, n)),
        np.diag(rng.random(n)),  # already diagonal
        low @ low.T,  # rank 2: a cluster of zero eigenvalues
        q @ np.diag([1.0] * (n // 2) + [0.0] * (n - n // 2)) @ q.T,  # two repeated eigenvalues
        block,  # zero rows and columns
        np.ones((n, n)),
        _grouped(n),  # identical rows: Householder scales fall to ~1e-38 in float32 (1 / scale overflowed)
        1e30 * (b @ b.T),  # would overflow float32 squares without the scaling
        1e-30 * (b @ b.T),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 14, 16, 31, 64, 100])
def test_top_eigenpairs_match_lapack(n: int, dtype) -> None:
    """Top eigenvalues as LAPACK's, orthonormal vectors, small residuals, and the best subspace."""
    rng = np.random.default_rng(n)
    mats = np.stack(_hard_cases(n, rng)).astype(dtype)
    tol = 50 * n * np.finfo(dtype).eps
    for cap in sorted({1, max(1, n // 3), max(1, n - 1), n}):
        values, vecs, total, _ = _solve_top(mats, cap)
        for lane, a in enumerate(mats.astype(np.float64)):
            exact = np.linalg.eigvalsh(a)[::-1]
            norm = max(abs(exact).max(), np.finfo(np.float64).tiny)
            w, v = values[lane].astype(np.float64), vecs[lane].astype(np.float64)
            assert np.all(np.diff(w) <= 0), (cap, lane)  # descending
            assert np.abs(w - np.maximum(exact[:cap], 0)).max() <= tol * norm, (cap, lane)
            assert np.abs(v.T @ v - np.eye(cap)).max() <= tol, (cap, lane)  # orthonormal
            assert np.abs(a @ v - v * w).max() <= 4 * tol * norm, (cap, lane)  # eigenvectors
            captured = np.trace(v.T @ a @ v)  # the kept subspace holds the top weight, as LAPACK's does
            assert captured >= exact[:cap].sum() - cap * tol * norm, (cap, lane)
            assert abs(total[lane] - np.trace(a)) <= tol * abs(np.trace(a)) + np.finfo(dtype).tiny, (cap, lane)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_eigenpairs_do_not_depend_on_neighbours_or_scratch(dtype) -> None:
    """A lane's result is the same bits whatever its neighbours and whatever the scratch held before."""
    rng = np.random.default_rng(0)
    n, cap = 14, 5
    cases = np.stack(_hard_cases(n, rng)).astype(dtype)
    values, vecs, total, _ = _solve_top(cases, cap)
    shuffled = np.concatenate([cases[::-1], rng.normal(size=(5, n, n)).astype(dtype)])
    again, again_vecs, again_total, _ = _solve_top(shuffled, cap, fill=np.nan)
    assert np.array_equal(again[: len(cases)][::-1], values)
    assert np.array_equal(again_vecs[: len(cases)][::-1], vecs)
    assert np.array_equal(again_total[: len(cases)][::-1], total)


def test_repeated_eigenvalues_give_a_basis_of_their_eigenspace() -> None:
    """Repeated eigenvalues: any orthonormal basis of the eigenspace is right. The identity's twisted solves
    all return the same vector, so its lane is redone by LAPACK."""
    n = 8
    q = np.linalg.qr(np.random.default_rng(3).normal(size=(n, n)))[0]
    repeated = q @ np.diag([3.0, 3.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.0]) @ q.T
    values, vecs, _, fell_back = _solve_top(np.stack([repeated, np.eye(n)]), 4)
    assert fell_back[1]
    assert np.allclose(values[0], [3, 3, 3, 1]) and np.allclose(values[1], 1)
    for v, a in zip(vecs, (repeated, np.eye(n)), strict=True):
        assert np.allclose(v.T @ v, np.eye(4))
        assert np.allclose(a @ v, v * np.diag(v.T @ a @ v))


@pytest.mark.parametrize(("dtype", "coupling"), [(np.float32, 1e-4), (np.float64, 1e-12)])
def test_eigenvectors_hold_no_subnormal_numbers(dtype, coupling: float) -> None:
    """Weakly coupled rows: the eigenvectors decay below the smallest normal number away from their peak.
    Those entries come back as zero (subnormal arithmetic is ~100x slower on x86), the pairs stay exact."""
    n = 31
    t = np.diag(np.linspace(1.0, 0.1, n)) + coupling * (np.eye(n, k=1) + np.eye(n, k=-1))
    mats = np.stack([t, t[::-1, ::-1]]).astype(dtype)
    values, vecs, _, _ = _solve_top(mats, 5)
    assert not ((vecs != 0) & (np.abs(vecs) < np.finfo(dtype).tiny)).any()
    tol = 50 * n * np.finfo(dtype).eps
    for lane, a in enumerate(mats.astype(np.float64)):
        v = vecs[lane].astype(np.float64)
        assert np.allclose(values[lane], np.linalg.eigvalsh(a)[::-1][:5], rtol=0, atol=tol)
        assert np.abs(v.T @ v - np.eye(5)).max() <= tol
        assert np.abs(a @ v - v * values[lane].astype(np.float64)).max() <= tol


def test_large_matrices_use_lapack() -> None:
    rng = np.random.default_rng(1)
    n = _kernels._LAPACK_MIN + 1
    b = rng.normal(size=(3, n, n))
    mats = b @ b.transpose(0, 2, 1)
    values, vecs, _, fell_back = _solve_top(mats, 3)
    assert not fell_back.any()  # the whole call went to LAPACK, not the fallback
    for lane, a in enumerate(mats):
        assert np.allclose(values[lane], np.linalg.eigvalsh(a)[::-1][:3])
        assert np.allclose(a @ vecs[lane], vecs[lane] * values[lane])


@pytest.mark.parametrize("residual", [0, 2])
@pytest.mark.parametrize(("height", "width"), [(28, 28), (32, 32), (12, 20)])
def test_two_site_decode_equals_the_lane_kernel(height: int, width: int, residual: int) -> None:
    """Two-site chains decode by batched matrix products: to uint8 in float64, as the per-item kernel, whose images
    they equal; the float32 lane kernel gives the same values to rounding, and uint8 at most one apart (at ties)."""
    import torch

    import mpsdata
    from mpsdata import _engine

    x = torch.randint(0, 256, (70, height, width), generator=torch.Generator().manual_seed(height + residual))
    m = mpsdata.decompose(x.to(torch.uint8), ratio=0.4, residual=residual)
    layout = m.layout
    assert len(layout.site_dims) == 2  # the default below 32 px is [H, W]; at 32 px a two-level block layout
    packed = m._packed  # (B, terms, P)
    args = (packed, layout.scatter_index, layout.site_dims, m.bond_dims)
    fast = _engine.decode(*args, backend="numba")
    lanes = _engine._decode_numba(*args, quantize=False)
    torch.testing.assert_close(fast, lanes, rtol=1e-5, atol=1e-4)
    fast8 = _engine.decode(*args, quantize=True, backend="numba")
    lanes8 = _engine._decode_numba(*args, quantize=True)
    assert fast8.dtype == torch.uint8 and fast8.shape == (70, height * width)
    assert int((fast8.int() - lanes8.int()).abs().max()) <= 1  # a value at a rounding boundary may differ by one
    sites, bonds = np.asarray(layout.site_dims, np.int64), np.asarray(m.bond_dims, np.int64)
    geometry = np.concatenate([[len(sites)], sites, bonds, _kernels._offsets(sites, bonds)])
    items = np.empty((70, 1, height * width), np.uint8)
    for i in range(70):
        _kernels._decode_single(packed[i][None].numpy(), geometry, layout.scatter_index, items[i])
    assert np.array_equal(items[:, 0], fast8.numpy())  # what ds[i] gives is what decode_batch gives
