"""Batched TT-SVD and contraction on flat site-ordered data, for CPU (numba kernels) and any torch device.

Everything here works on ``(B, N)`` batches of images already in site order (or, for the CPU kernels,
with the layout's gather/scatter index fused in) and packed cores ``(B, terms, P)``: core ``k`` of a term
is the slice ``offsets[k]:offsets[k+1]`` reshaped to ``(bond[k-1], site[k], bond[k])``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import _budget, _kernels

__all__ = ["Packed", "encode", "decode", "core_offsets"]

# Below this many images per thread the pool costs more than it saves.
_MIN_PER_THREAD = 4 * _kernels.LANES


@dataclass(frozen=True)
class Packed:
    """Cores of a batch packed as ``(B, terms, P)`` plus per-image ranks and squared truncation errors."""

    cores: torch.Tensor
    ranks: torch.Tensor  # (B, terms, n - 1) int64
    eps2: torch.Tensor  # (B, terms, n - 1) weight discarded by the sweep; sums to the squared error
    tails: torch.Tensor | None  # (B, terms, n - 1) weight beyond the rank in the original unfolding (Def. 1)


def core_offsets(site_dims: Sequence[int], bonds: Sequence[int]) -> np.ndarray:
    """Start of every core in the packed parameter vector, plus the total at the end."""
    return _kernels._offsets(np.asarray(site_dims, np.int64), np.asarray(bonds, np.int64))


# ---------------------------------------------------------------------------------------------------
# Thread pool for the CPU kernels (they release the GIL). Sized by torch.get_num_threads() so that
# DataLoader workers (which set 1 thread) do not oversubscribe; rebuilt after a fork.
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _reset_pool() -> None:
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)


def _run_chunks(fn, total: int, threads: int) -> None:
    """Run ``fn(start, stop)`` over ``[0, total)`` split into lane-aligned chunks, one per thread."""
    global _pool, _pool_size
    threads = max(1, min(threads, total // _MIN_PER_THREAD))
    if threads == 1:
        fn(0, total)
        return
    step = math.ceil(total / threads / _kernels.LANES) * _kernels.LANES
    with _pool_lock:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="mpsdata"), threads
        pool = _pool
    futures = [pool.submit(fn, start, min(start + step, total)) for start in range(0, total, step)]
    for future in futures:
        future.result()


# ---------------------------------------------------------------------------------------------------
def encode(
    x: torch.Tensor,
    gather: np.ndarray,
    site_dims: Sequence[int],
    bonds: Sequence[int],
    *,
    tol: float = 0.0,
    terms: int = 1,
    dtype: torch.dtype = torch.float32,
    tails: bool = True,
    backend: str = "auto",
) -> Packed:
    """TT-SVD of every row of ``x`` (``(B, V)``, read through ``gather``) with bonds at most ``bonds``.

    Args:
        x: Flat images, any real dtype, on any device.
        gather: Layout index, ``x[:, gather]`` is the site-ordered data.
        site_dims: Site dimensions.
        bonds: Bond caps (tight, see ``_budget.tighten``).
        tol: Relative tolerance; ``> 0`` lets every image stop at the smallest rank whose truncation
            error is at most ``tol / sqrt(n - 1) * ||x||`` per bond (Oseledets 2011).
        terms: 1 + the number of residual terms (paper Alg. 2).
        dtype: Float dtype of the math and of the cores.
        tails: Also compute every bond's Definition-1 truncation error on the original unfolding (an
            extra eigenvalue problem per truncated bond); without it ``Packed.tails`` is ``None``.
        backend: ``"numba"`` (CPU kernels), ``"torch"`` (any device) or ``"auto"``.
    """
    if tuple(bonds) != _budget.tighten(bonds, site_dims):
        raise ValueError(f"bonds {list(bonds)} are not tight for site dims {list(site_dims)}; use _budget.tighten")
    if backend == "auto":
        backend = "numba" if x.device.type == "cpu" else "torch"
    # tol is relative to the image, not to the padded tensor (whose copied pixels add norm): only the first
    # occurrence of each pixel counts towards ||x||, so the image's error stays within tol * ||x||.
    primary = np.zeros(len(gather), np.bool_)
    primary[np.unique(np.asarray(gather), return_index=True)[1]] = True
    if backend == "numba":
        return _encode_numba(x, gather, primary, site_dims, bonds, tol, terms, dtype, tails)
    return _encode_torch(x, gather, primary, site_dims, bonds, tol, terms, dtype, tails)


def contraction_cost(site_dims: Sequence[int], bonds: Sequence[int]) -> int:
    """Multiply-adds of a left-to-right contraction of one MPS."""
    full = [1, *bonds, 1]
    cost, rows = 0, site_dims[0]
    for k in range(1, len(site_dims)):
        cost += rows * full[k] * site_dims[k] * full[k + 1]
        rows *= site_dims[k]
    return cost


def mirror(
    packed: np.ndarray, site_dims: Sequence[int], bonds: Sequence[int], scatter: np.ndarray
) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...], np.ndarray]:
    """The same MPS with its sites in reverse order, for a cheaper left-to-right contraction.

    A big first site (hierarchical layouts put the coarse digits first, e.g. 49 for 28x28) makes every
    left-to-right step wide; contracting the mirrored chain costs e.g. 3.2k instead of 6.3k multiply-adds
    for 28x28 with sites (49, 4, 4). Returns the packed cores, sites, bonds and the scatter index of the
    mirror image; decoding them gives the same image.
    """
    n = int(np.prod(site_dims))
    # Position p in site order has digits (s_1..s_n); in the mirror it sits at digits (s_n..s_1).
    digits = np.unravel_index(np.arange(n), tuple(site_dims))
    moved = np.ravel_multi_index(tuple(reversed(digits)), tuple(reversed(site_dims)))
    return mirror_cores(packed, site_dims, bonds), tuple(reversed(site_dims)), tuple(reversed(bonds)), moved[scatter]


def mirror_cores(packed: np.ndarray, site_dims: Sequence[int], bonds: Sequence[int]) -> np.ndarray:
    """The packed cores of :func:`mirror` alone, without its scatter index, which costs a pass over every pixel
    position: too much to repeat per item when the index is known (the per-item decoder keeps its own)."""
    full = [1, *bonds, 1]
    offs = core_offsets(site_dims, bonds)
    lead = packed.shape[:-1]
    cores = [
        packed[..., offs[k] : offs[k + 1]].reshape(*lead, full[k], j, full[k + 1]) for k, j in enumerate(site_dims)
    ]
    mirrored = [np.swapaxes(c, -1, -3).reshape(*lead, c.shape[-1] * c.shape[-2] * c.shape[-3]) for c in reversed(cores)]
    return np.ascontiguousarray(np.concatenate(mirrored, axis=-1))


def decode(
    cores: torch.Tensor,
    scatter: np.ndarray,
    site_dims: Sequence[int],
    bonds: Sequence[int],
    *,
    quantize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Contract packed cores ``(B, terms, P)`` and sum the terms into flat images ``(B, V)``.

    With ``quantize`` the values are rounded and clamped to ``[0, 255]`` and returned as ``uint8``.
    """
    if backend == "auto":
        backend = "numba" if cores.device.type == "cpu" else "torch"
    if backend == "numba" and len(site_dims) == 2:
        return _decode_matrix(cores, scatter, site_dims, bonds, quantize)
    if backend == "numba":
        if contraction_cost(site_dims, bonds) > 1.25 * contraction_cost(site_dims[::-1], bonds[::-1]):
            floats = cores if cores.dtype in (torch.float32, torch.float64) else cores.float()
            flipped, site_dims, bonds, scatter = mirror(floats.numpy(), site_dims, bonds, scatter)
            cores = torch.from_numpy(flipped)
        return _decode_numba(cores, scatter, site_dims, bonds, quantize)
    return _decode_torch(cores, scatter, site_dims, bonds, quantize)


def _decode_matrix(cores, scatter, site_dims, bonds, quantize) -> torch.Tensor:
    """Two sites are one matrix product per image: batched BLAS beats the lane kernel there. To uint8 the product
    is in float64, as in the single-image kernel: BLAS picks its own summation order, and in float32 the two
    disagreed where a value lies within rounding of a tie (150 values of the 60,000 Fashion-MNIST training
    images); in float64 the float32 cores' products are exact and the sums agree far below that. It is no slower:
    1.019 us per 28x28 rank-5 image against 1.315 in float32 and 1.165 for the lane kernel, core gather included
    (``benchmarks/core_file.py --parts decode``)."""
    B, terms, _ = cores.shape
    if quantize:
        cores = cores.to(torch.float64)
    elif cores.dtype not in (torch.float32, torch.float64):
        cores = cores.float()
    (d0, d1), bond = site_dims, bonds[0]
    left = cores[:, :, : d0 * bond].reshape(B, terms, d0, bond).transpose(1, 2).reshape(B, d0, terms * bond)
    right = cores[:, :, d0 * bond : d0 * bond + bond * d1].reshape(B, terms * bond, d1)  # terms summed by the product
    values = torch.bmm(left, right).reshape(B, d0 * d1)
    if scatter.shape[0] != d0 * d1 or not np.array_equal(scatter, np.arange(d0 * d1)):
        values = values.index_select(1, torch.from_numpy(np.asarray(scatter, np.int64)))
    if quantize:
        return values.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)  # float64 already
    return values


# ---------------------------------------------------------------------------------------------------
def _encode_numba(x, gather, primary, site_dims, bonds, tol, terms, dtype, want_tails) -> Packed:
    sites = np.asarray(site_dims, np.int64)
    caps = np.asarray(bonds, np.int64)
    offs = _kernels._offsets(sites, caps)
    own_tail = _kernels._own_tails(sites, caps, tol) & want_tails
    gram = _kernels._gram_size(sites, caps, own_tail)
    B = x.shape[0]
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.to(dtype)
    xs = x.contiguous().numpy()
    cores = np.zeros((B, terms, int(offs[-1])), np_dtype)
    ranks = np.zeros((B, terms, len(caps)), np.int64)
    eps2 = np.zeros((B, terms, len(caps)), np_dtype)
    tails = np.zeros((B, terms, len(caps)), np_dtype)
    gather = np.ascontiguousarray(gather, np.int64)

    lanes = min(B, _kernels.LANES)  # lanes never change a lane's result, only the speed

    def run(start: int, stop: int) -> None:
        _kernels._encode_chunk(
            xs[start:stop], gather, primary, sites, caps, offs, gram, own_tail, float(tol), terms, lanes,
            cores[start:stop], ranks[start:stop], eps2[start:stop], tails[start:stop],
        )  # fmt: skip

    if B:
        _run_chunks(run, B, torch.get_num_threads())
    tails_t = torch.from_numpy(tails) if want_tails else None
    return Packed(torch.from_numpy(cores), torch.from_numpy(ranks), torch.from_numpy(eps2), tails_t)


def _decode_numba(cores, scatter, site_dims, bonds, quantize) -> torch.Tensor:
    sites = np.asarray(site_dims, np.int64)
    caps = np.asarray(bonds, np.int64)
    offs = _kernels._offsets(sites, caps)
    if cores.dtype not in (torch.float32, torch.float64):
        cores = cores.float()
    cs = cores.contiguous().numpy()
    B = cs.shape[0]
    out = np.empty((B, scatter.shape[0]), np.uint8 if quantize else cs.dtype)
    scatter = np.ascontiguousarray(scatter, np.int64)
    lanes = min(B, _kernels.LANES)  # lanes never change a lane's result, only the speed

    def run(start: int, stop: int) -> None:
        _kernels._decode_chunk(cs[start:stop], sites, caps, offs, scatter, lanes, out[start:stop], quantize)

    if B:
        _run_chunks(run, B, torch.get_num_threads())
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------------
# torch path: the same algorithm with batched torch.linalg, for CUDA tensors and as an independent
# reference on CPU.
def _encode_torch(x, gather, primary, site_dims, bonds, tol, terms, dtype, want_tails) -> Packed:
    index = torch.from_numpy(np.asarray(gather, np.int64)).to(x.device)
    weight = torch.from_numpy(primary).to(device=x.device, dtype=dtype)
    residual = x.to(dtype).index_select(1, index)
    n_bonds = len(bonds)
    # Every term is held to the image's norm, not to its residual's.
    delta2 = tol * tol * (residual.square() * weight).sum(1) / max(n_bonds, 1)
    packed, ranks, eps2, tails = [], [], [], []
    for term in range(terms):
        term_cores, term_ranks, term_eps2 = _ttsvd_torch(residual, site_dims, bonds, tol, delta2)
        packed.append(torch.cat([c.flatten(1) for c in term_cores], 1))
        ranks.append(term_ranks)
        eps2.append(term_eps2)
        tails.append(_unfolding_tails_torch(residual, site_dims, term_ranks) if want_tails else term_eps2)
        if term + 1 < terms:
            residual = residual - _contract_torch(term_cores)
    B = x.shape[0]
    ranks_t, eps2_t, tails_t = (torch.stack(t, 1).reshape(B, terms, n_bonds) for t in (ranks, eps2, tails))
    return Packed(torch.stack(packed, 1), ranks_t, eps2_t, tails_t if want_tails else None)


def _unfolding_tails_torch(a: torch.Tensor, site_dims, ranks: torch.Tensor) -> torch.Tensor:
    """Weight beyond each image's rank in every unfolding of ``a`` (paper Definition 1, squared)."""
    B, total = a.shape
    tails, left = [], 1
    for k, j in enumerate(site_dims[:-1]):
        left *= j
        mat = a.reshape(B, left, total // left)
        gram = mat @ mat.mT if left <= total // left else mat.mT @ mat
        evals = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)
        keep = torch.arange(evals.shape[-1], device=a.device)[None] < ranks[:, k, None]
        tails.append(torch.where(keep, 0, evals).sum(-1))
    return torch.stack(tails, 1)


def _ttsvd_torch(a: torch.Tensor, site_dims, bonds, tol, delta2: torch.Tensor):
    """TT-SVD of every row of ``a``; with ``tol > 0`` each bond of row ``i`` discards at most ``delta2[i]``."""
    B = a.shape[0]
    n_bonds = len(bonds)
    eps = torch.finfo(a.dtype).eps
    cores, ranks, eps2 = [], [], []
    cur = a
    left, rest = 1, a.shape[1]
    for k in range(n_bonds):
        m, ncol, cap = left * site_dims[k], rest // site_dims[k], bonds[k]
        mat = cur.reshape(B, m, ncol)
        small_left = m <= ncol
        gram = mat @ mat.mT if small_left else mat.mT @ mat
        evals, evecs = torch.linalg.eigh(gram)
        evals = evals.flip(-1).clamp_min(0)
        evecs = evecs.flip(-1)[..., :cap]
        total = evals.sum(-1)
        kept = evals[..., :cap].cumsum(-1)
        if tol > 0:
            fits = (total[:, None] - kept) <= delta2[:, None]
            rank = torch.where(fits.any(-1), fits.int().argmax(-1) + 1, torch.full_like(total, cap, dtype=torch.long))
        else:
            rank = torch.full((B,), cap, dtype=torch.long, device=a.device)
        keep = torch.arange(cap, device=a.device)[None] < rank[:, None]
        kept_total = torch.where(keep, evals[..., :cap], 0).sum(-1)
        eps2.append((total - kept_total).clamp_min(0))
        ranks.append(rank)
        evecs = evecs * keep[:, None, :]
        if small_left:
            u = evecs
            cur = u.mT @ mat
        else:
            sq = evals[..., :cap]
            sigma = torch.where((sq > eps * eps * sq[..., :1]) & keep, sq.sqrt(), 0)
            inv = torch.where(sigma > 0, 1 / sigma, 0)
            u = (mat @ evecs) * inv[:, None, :]
            cur = sigma[..., :, None] * evecs.mT
        cores.append(u.reshape(B, left, site_dims[k], cap))
        left, rest = cap, ncol
    cores.append(cur.reshape(B, left, site_dims[-1], 1))
    return cores, torch.stack(ranks, 1), torch.stack(eps2, 1)


def _contract_torch(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract cores ``(B, d, j, d')`` left to right into ``(B, prod j)``."""
    B = cores[0].shape[0]
    out = cores[0].reshape(B, -1, cores[0].shape[-1])
    for core in cores[1:]:
        out = torch.bmm(out, core.reshape(B, core.shape[1], -1)).reshape(B, -1, core.shape[-1])
    return out.reshape(B, -1)


def unpack(packed: torch.Tensor, site_dims: Sequence[int], bonds: Sequence[int]) -> list[torch.Tensor]:
    """Views of the cores of packed ``(..., P)`` as ``(..., d_{k-1}, j_k, d_k)``."""
    offs = core_offsets(site_dims, bonds)
    full = [1, *bonds, 1]
    return [
        packed[..., offs[k] : offs[k + 1]].unflatten(-1, (full[k], j, full[k + 1])) for k, j in enumerate(site_dims)
    ]


def _decode_torch(cores, scatter, site_dims, bonds, quantize) -> torch.Tensor:
    B, terms, _ = cores.shape
    if cores.dtype not in (torch.float32, torch.float64):
        cores = cores.float()
    flat = cores.reshape(B * terms, -1)
    values = _contract_torch(unpack(flat, site_dims, bonds)).reshape(B, terms, -1).sum(1)
    values = values.index_select(1, torch.from_numpy(np.asarray(scatter, np.int64)).to(values.device))
    if quantize:
        return values.add(0.5).floor_().clamp_(0, 255).to(torch.uint8)
    return values
