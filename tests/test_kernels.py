"""The lane-parallel symmetric eigensolver behind the TT-SVD kernels, against LAPACK."""

from __future__ import annotations

import numpy as np
import pytest

from mpsdata import _kernels


def _solve(mats: np.ndarray, vectors: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Run ``_kernels._eigh_lanes`` on ``mats`` ``(L, n, n)``; returns eigenvalues ``(L, n)`` and vectors."""
    lanes, n, _ = mats.shape
    dtype = mats.dtype
    G = np.ascontiguousarray(mats.transpose(1, 2, 0))
    V = np.zeros_like(G)
    W = np.empty((n, n), dtype)
    d, e = np.empty(n, dtype), np.empty(n, dtype)
    work = np.empty((2 * n + 12, lanes), dtype)
    act = np.empty(lanes, np.bool_)
    _kernels._eigh_lanes(G, V, n, np.finfo(dtype).eps, W, d, e, vectors, work, act)
    values = np.stack([np.diag(G[:, :, lane]) for lane in range(lanes)])
    vecs = np.stack([V[:, :, lane] for lane in range(lanes)])  # row p: eigenvector of values[:, p]
    return values, vecs


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
@pytest.mark.parametrize("n", [1, 2, 3, 8, 14, 16])
def test_eigh_lanes_matches_lapack(n: int, dtype) -> None:
    rng = np.random.default_rng(n)
    cases = _hard_cases(n, rng)
    mats = np.stack(cases).astype(dtype)
    values, vecs = _solve(mats)
    tol = 50 * n * np.finfo(dtype).eps
    for lane, a in enumerate(mats.astype(np.float64)):
        norm = max(np.abs(np.linalg.eigvalsh(a)).max(), np.finfo(np.float64).tiny)
        w, v = values[lane].astype(np.float64), vecs[lane].astype(np.float64)
        assert np.abs(np.sort(w) - np.linalg.eigvalsh(a)).max() <= tol * norm, lane
        assert np.abs(v @ v.T - np.eye(n)).max() <= tol, lane  # orthonormal
        assert np.abs(v.T @ np.diag(w) @ v - a).max() <= tol * norm, lane  # A = V^T diag(w) V


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eigh_lanes_values_only_and_lane_independence(dtype) -> None:
    """Values without vectors agree, and a lane's result does not depend on its neighbours."""
    rng = np.random.default_rng(0)
    n = 14
    cases = np.stack(_hard_cases(n, rng)).astype(dtype)
    values, _ = _solve(cases)
    only, _ = _solve(cases, vectors=False)
    tol = 50 * n * np.finfo(dtype).eps
    scale = np.abs(values).max(1, keepdims=True) + np.finfo(dtype).tiny
    assert np.all(np.abs(np.sort(only, 1) - np.sort(values, 1)) <= tol * scale)
    shuffled = np.concatenate([cases[::-1], rng.normal(size=(5, n, n)).astype(dtype)])
    again, again_vecs = _solve(shuffled)
    _, vecs = _solve(cases)
    assert np.array_equal(again[: len(cases)][::-1], values)  # bit for bit
    assert np.array_equal(again_vecs[: len(cases)][::-1], vecs)


def test_eigh_lanes_large_matrices_use_lapack() -> None:
    rng = np.random.default_rng(1)
    n = _kernels._LAPACK_MIN + 1
    b = rng.normal(size=(3, n, n))
    mats = b @ b.transpose(0, 2, 1)
    values, vecs = _solve(mats)
    for lane, a in enumerate(mats):
        assert np.allclose(np.sort(values[lane]), np.linalg.eigvalsh(a))
        assert np.allclose(vecs[lane].T @ np.diag(values[lane]) @ vecs[lane], a)


@pytest.mark.parametrize("residual", [0, 2])
@pytest.mark.parametrize(("height", "width"), [(28, 28), (32, 32), (12, 20)])
def test_two_site_decode_equals_the_lane_kernel(height: int, width: int, residual: int) -> None:
    """Two-site chains decode by batched matrix products; the lane kernel gives the same images."""
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
    differ = fast8 != lanes8
    assert int((fast8.int() - lanes8.int()).abs().max()) <= 1  # a value at a rounding boundary may differ by one
    if residual == 0:
        assert not bool(differ.any())  # one term: the same sums in the same dtype, so the same images
