"""Storage precision of MPS cores: float32 / float16 / int8 / int4 with per-core scales, and exact bytes.

Why a gauge first: an MPS is defined up to invertible matrices on its bonds, and a quantiser with one scale
per core wastes levels when a core's entries span many orders of magnitude. TT-SVD (Oseledets 2011) leaves
every core but the last *left-orthonormal* (its ``(d_{k-1} j_k) x d_k`` unfolding has orthonormal columns),
so their entries lie in ``[-1, 1]`` and the image's norm sits in the last core alone. :func:`left_canonical`
restores that gauge by QR sweeps for cores from elsewhere.

Schemes (values per core, plus the scales the integer schemes need):

========== ====================================== ======================================================
scheme     values                                 scales per term
========== ====================================== ======================================================
float32    4 bytes each                           none
float16    2 bytes each                           none
int8       1 byte each, ``round(v / s * 127)``    ``n - 1`` float16 (cores ``1..n-1``) + 1 float32 (last)
int4       two per byte, ``round(v / s * 7)``     as int8
========== ====================================== ======================================================

``s`` is the largest ``|v|`` of the core (per image, term and core). The last core's scale is float32 because
it carries the norm, up to ``255 * sqrt(H W C)`` (beyond float16 for large colour images). An int4 term packs
its ``P`` values into ``ceil(P / 2)`` bytes, low nibble first, each nibble ``q + 8``.

Quantising after the fact loses more than it must: :func:`quantize_refit` re-runs the TT-SVD with the
quantisation inside the sweep (each core is fitted to what the *already quantised* cores on its left leave,
the last core by least squares), and then optionally a few ALS sweeps on the integer grid (each core
re-solved by least squares against the quantised others, re-quantised, kept only where the error drops).
Residual terms (paper Alg. 2) decompose what the quantised earlier terms left, so they also repair the
quantisation error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import _budget, _engine
from ._signal import psnr
from ._typing import ChannelMode

__all__ = [
    "SCHEMES",
    "QuantizedCores",
    "bonds_for_bytes",
    "dequantize",
    "left_canonical",
    "nbytes_per_image",
    "quantize",
    "quantize_mps",
    "quantize_refit",
    "reconstruct",
    "search_layout",
    "apply_layout",
]

SCHEMES = ("float32", "float16", "int8", "int4")
_LEVELS = {"int8": 127, "int4": 7}  # symmetric grids: -L..L
_VALUE_BITS = {"float32": 32, "float16": 16, "int8": 8, "int4": 4}


# ---------------------------------------------------------------------------------------------------
# Byte accounting
def _check_scheme(scheme: Any) -> str:
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a string, one of {SCHEMES}, got {type(scheme).__name__}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return scheme


def value_nbytes(num_params: int, scheme: str) -> int:
    """Bytes of the values of one MPS term with ``num_params`` parameters."""
    return math.ceil(num_params * _VALUE_BITS[_check_scheme(scheme)] / 8)


def scale_nbytes(num_sites: int, scheme: str) -> int:
    """Bytes of the scales of one term: float16 per core, float32 for the last; none for float schemes."""
    return 0 if _check_scheme(scheme) in ("float32", "float16") else 2 * (num_sites - 1) + 4


def nbytes_per_image(site_dims: Sequence[int], bond_dims: Sequence[int], terms: int = 1, scheme: str = "int8") -> int:
    """Every byte one MPS (one image, or one channel with ``channel_mode="separate"``) stores: values + scales.

    Args:
        site_dims: Site dimensions ``j_1 ... j_n``.
        bond_dims: Bond dimensions ``d_1 ... d_{n-1}``.
        terms: 1 + the number of residual terms.
        scheme: One of :data:`SCHEMES`.

    Returns:
        ``terms * (value bytes + scale bytes)``, before any generic (HDF5 filter) compression.

    Example:
        >>> nbytes_per_image([49, 4, 4], [8, 4], scheme="int8")  # 392 + 128 + 16 values, 2 + 2 + 4 scale bytes
        544
        >>> nbytes_per_image([49, 4, 4], [8, 4], scheme="int4")  # 268 value bytes + 8
        276
        >>> nbytes_per_image([49, 4, 4], [8, 4], scheme="float16")
        1072
    """
    params = _budget.num_params(bond_dims, site_dims)
    return terms * (value_nbytes(params, scheme) + scale_nbytes(len(site_dims), scheme))


def bonds_for_bytes(
    site_dims: Sequence[int], bytes_ratio: float, num_values: int, terms: int = 1, scheme: str = "int8"
) -> tuple[int, ...]:
    """Bond dimensions whose stored bytes (:func:`nbytes_per_image`) never exceed ``bytes_ratio`` of the raw image.

    The raw image is ``num_values`` uint8 bytes. The bonds are those of :func:`mpsdata._budget.bonds_for_ratio`
    for the largest parameter count that fits the byte budget after the scales, so they grow in the same
    data-independent order as the parameter budget.

    Args:
        site_dims: Site dimensions.
        bytes_ratio: Budget, stored bytes over raw uint8 bytes, ``> 0`` (above 1 is allowed: float32 needs it).
        num_values: Values of the original image (the raw uint8 bytes).
        terms: 1 + the number of residual terms.
        scheme: One of :data:`SCHEMES`.

    Raises:
        ValueError: the budget cannot hold the smallest MPS (every bond 1).

    Example:
        >>> b = bonds_for_bytes([49, 4, 4], 0.3, 784, scheme="int8")
        >>> b, nbytes_per_image([49, 4, 4], b, scheme="int8") <= 0.3 * 784
        ((3, 4), True)
        >>> bonds_for_bytes([49, 4, 4], 0.3, 784, scheme="int4")  # twice the values in the same bytes
        (6, 4)
    """
    scheme = _check_scheme(scheme)
    if isinstance(bytes_ratio, bool) or not isinstance(bytes_ratio, (int, float, np.integer, np.floating)):
        raise TypeError(f"bytes_ratio must be a number, got {type(bytes_ratio).__name__}")
    if not 0 < bytes_ratio < math.inf:
        raise ValueError(f"bytes_ratio must be positive and finite, got {bytes_ratio}")
    budget = math.floor(bytes_ratio * num_values + 1e-9)
    per_term = budget // terms - scale_nbytes(len(site_dims), scheme)
    params = (per_term * 8) // _VALUE_BITS[scheme]
    smallest = nbytes_per_image(site_dims, [1] * (len(site_dims) - 1), terms, scheme)
    if params < _budget.num_params([1] * (len(site_dims) - 1), site_dims):
        raise ValueError(
            f"bytes_ratio {bytes_ratio} ({budget} bytes of {num_values}) is too small for any {scheme} MPS on site "
            f"dims {list(site_dims)} with {terms} term(s): the smallest (every bond 1) takes {smallest} bytes, "
            f"bytes_ratio >= {smallest / num_values:.4f}; raise the budget, use a smaller scheme or fewer sites"
        )
    bonds = _budget.bonds_for_ratio(site_dims, params * terms / num_values, num_values, terms)
    assert nbytes_per_image(site_dims, bonds, terms, scheme) <= budget  # the invariant the caller relies on
    return bonds


# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class QuantizedCores:
    """Stored form of a batch of MPS: quantised values and their scales, with exact byte counts.

    Attributes:
        values: ``(B, terms, W)``: float32 / float16 values (``W = P``), int8 (``W = P``), or uint8 holding
            two int4 values per byte (``W = ceil(P / 2)``, low nibble first, nibble = ``q + 8``).
        scales: ``(B, terms, n)`` float32 per-core scales (cores ``1..n-1`` hold float16-representable
            values, as stored), or ``None`` for float schemes.
        scheme: One of :data:`SCHEMES`.
        site_dims: Site dimensions.
        bond_dims: Bond dimensions.
    """

    values: torch.Tensor
    scales: torch.Tensor | None
    scheme: str
    site_dims: tuple[int, ...]
    bond_dims: tuple[int, ...]

    @property
    def terms(self) -> int:
        return self.values.shape[1]

    @property
    def nbytes(self) -> torch.Tensor:
        """Stored bytes per MPS, ``(B,)`` int64 (:func:`nbytes_per_image`)."""
        per = nbytes_per_image(self.site_dims, self.bond_dims, self.terms, self.scheme)
        return torch.full((self.values.shape[0],), per, dtype=torch.int64)

    def dequantize(self) -> torch.Tensor:
        """Packed float32 cores ``(B, terms, P)`` for :func:`mpsdata._engine.decode`."""
        return dequantize(self)

    def __repr__(self) -> str:
        return (
            f"QuantizedCores(batch={self.values.shape[0]}, terms={self.terms}, scheme={self.scheme!r}, "
            f"site_dims={self.site_dims}, bond_dims={self.bond_dims})"
        )


def _full(bonds: Sequence[int]) -> list[int]:
    return [1, *[int(b) for b in bonds], 1]


def left_canonical(packed: torch.Tensor, site_dims: Sequence[int], bond_dims: Sequence[int]) -> torch.Tensor:
    """The same MPS with every core but the last left-orthonormal (QR sweep, left to right).

    Args:
        packed: Cores ``(..., P)`` packed as in :mod:`mpsdata._engine`.
        site_dims: Site dimensions.
        bond_dims: Bond dimensions (kept: a rank-deficient core keeps zero columns).

    Returns:
        Packed cores of the same shape and dtype; they contract to the same tensor.

    Example:
        >>> import torch
        >>> p = torch.randn(3, 2 * 2 + 2 * 2 * 2 + 2 * 2, dtype=torch.float64)
        >>> q = left_canonical(p, [2, 2, 2], [2, 2])
        >>> first = q[:, :4].reshape(3, 2, 2)
        >>> bool(torch.allclose(first.mT @ first, torch.eye(2, dtype=torch.float64).expand(3, 2, 2)))
        True
    """
    lead = packed.shape[:-1]
    flat = packed.reshape(-1, packed.shape[-1])
    if flat.shape[0] == 0:
        return packed.clone()
    work = flat.to(torch.float64)
    cores = [c.clone() for c in _engine.unpack(work, site_dims, bond_dims)]
    full = _full(bond_dims)
    for k in range(len(site_dims) - 1):
        b = work.shape[0]
        mat = cores[k].reshape(b, full[k] * site_dims[k], full[k + 1])
        q, r = torch.linalg.qr(mat)  # q: (b, m, min(m, d)); tight bonds give m >= d
        cores[k] = q.reshape(b, full[k], site_dims[k], full[k + 1])
        nxt = cores[k + 1].reshape(b, full[k + 1], -1)
        cores[k + 1] = (r @ nxt).reshape(cores[k + 1].shape)
    out = torch.cat([c.reshape(c.shape[0], -1) for c in cores], -1)
    return out.to(packed.dtype).reshape(*lead, packed.shape[-1])


def _quantize_core(core: torch.Tensor, scheme: str, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and stored scale of cores ``(B, ...)``; the scale is float16-rounded unless ``last``."""
    level = _LEVELS[scheme]
    scale = core.detach().abs().flatten(1).amax(1).to(torch.float32)
    if not last:
        # Round the scale *up* to float16 so no value maps past the grid.
        s16 = scale.to(torch.float16)
        bump = s16.to(torch.float32) < scale
        s16 = torch.where(bump, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
        scale = s16.to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    shape = (-1,) + (1,) * (core.ndim - 1)
    codes = torch.round(core.to(torch.float64) / safe.to(torch.float64).view(shape) * level).clamp_(-level, level)
    return codes.to(torch.int8), scale


def _dequantize_core(codes: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    shape = (-1,) + (1,) * (codes.ndim - 1)
    return codes.to(torch.float32) * (scale / _LEVELS[scheme]).view(shape)


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``(..., P)`` int8 in ``-7..7`` -> ``(..., ceil(P/2))`` uint8, low nibble first."""
    nib = (codes.to(torch.int16) + 8).to(torch.uint8)
    if nib.shape[-1] % 2:
        nib = torch.cat([nib, torch.full_like(nib[..., :1], 8)], -1)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def _unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    low = (packed & 15).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    return torch.stack([low, high], -1).flatten(-2)[..., :count].to(torch.int8)


def _store(cores: list[torch.Tensor], scheme: str, site_dims, bond_dims, batch: int, terms: int) -> QuantizedCores:
    """Quantise float cores ``(B * terms, d, j, d')`` into :class:`QuantizedCores`."""
    site_dims, bond_dims = tuple(int(j) for j in site_dims), tuple(int(d) for d in bond_dims)
    if scheme in ("float32", "float16"):
        dtype = torch.float32 if scheme == "float32" else torch.float16
        flat = torch.cat([c.flatten(1) for c in cores], -1).to(dtype)
        return QuantizedCores(flat.reshape(batch, terms, flat.shape[-1]), None, scheme, site_dims, bond_dims)
    codes, scales = [], []
    for k, core in enumerate(cores):
        c, s = _quantize_core(core, scheme, last=k == len(cores) - 1)
        codes.append(c.flatten(1))
        scales.append(s)
    flat = torch.cat(codes, -1)
    values = _pack_int4(flat) if scheme == "int4" else flat
    scale_t = torch.stack(scales, -1)
    return QuantizedCores(
        values.reshape(batch, terms, values.shape[-1]),
        scale_t.reshape(batch, terms, len(site_dims)),
        scheme,
        site_dims,
        bond_dims,
    )


def quantize(
    packed: torch.Tensor, site_dims: Sequence[int], bond_dims: Sequence[int], scheme: str = "int8"
) -> QuantizedCores:
    """Quantise packed cores ``(B, terms, P)`` in the left-canonical gauge (no refit).

    Args:
        packed: Cores as in :mod:`mpsdata._engine` (``MPS._packed``), any float dtype and device.
        site_dims: Site dimensions.
        bond_dims: Bond dimensions.
        scheme: One of :data:`SCHEMES`.

    Returns:
        The stored form; :meth:`QuantizedCores.dequantize` gives float32 cores back.

    Example:
        >>> import torch
        >>> from mpsdata import _engine
        >>> p = left_canonical(torch.randn(2, 1, 4 + 8 + 4, dtype=torch.float64), [2, 2, 2], [2, 2])
        >>> q = quantize(p, [2, 2, 2], [2, 2], "int8")
        >>> q.values.dtype, q.nbytes.tolist()  # 16 values + 2 + 2 + 4 scale bytes
        (torch.int8, [24, 24])
        >>> err = (q.dequantize() - p).abs().max() / p.abs().max()
        >>> bool(err < 1 / 127)
        True
    """
    scheme = _check_scheme(scheme)
    if packed.ndim != 3:
        raise ValueError(f"packed cores must have shape (B, terms, P), got {tuple(packed.shape)}")
    offs = _engine.core_offsets(site_dims, bond_dims)
    if packed.shape[-1] != int(offs[-1]):
        raise ValueError(
            f"packed cores hold {packed.shape[-1]} values per term, but site dims {list(site_dims)} with bonds "
            f"{list(bond_dims)} need {int(offs[-1])}"
        )
    b, terms, _ = packed.shape
    if scheme not in ("float32", "float16"):
        packed = left_canonical(packed, site_dims, bond_dims)
    cores = _engine.unpack(packed.reshape(b * terms, packed.shape[-1]), site_dims, bond_dims)
    return _store(list(cores), scheme, site_dims, bond_dims, b, terms)


def dequantize(q: QuantizedCores) -> torch.Tensor:
    """Float32 packed cores ``(B, terms, P)`` of what :class:`QuantizedCores` stores."""
    if q.scheme in ("float32", "float16"):
        return q.values.to(torch.float32)
    offs = _engine.core_offsets(q.site_dims, q.bond_dims)
    codes = _unpack_int4(q.values, int(offs[-1])) if q.scheme == "int4" else q.values
    assert q.scales is not None
    out = codes.to(torch.float32)
    for k in range(len(q.site_dims)):
        out[..., offs[k] : offs[k + 1]] *= q.scales[..., k : k + 1] / _LEVELS[q.scheme]
    return out


# ---------------------------------------------------------------------------------------------------
# Quantisation-aware fit
def _top_left_vectors(mat: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of ``(B, m, n)`` (zero columns beyond the matrix's rank)."""
    u = torch.linalg.svd(mat, full_matrices=False)[0]
    u = u[..., :rank]
    if u.shape[-1] < rank:
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], rank - u.shape[-1])], -1)
    return u


def _gram_pinv(gram: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of small symmetric PSD matrices ``(B, d, d)`` by eigendecomposition.

    ``d`` is a bond dimension, so this costs far less than a batched SVD of the tall environment (which,
    with LAPACK's per-matrix overhead and thread start-up, took seconds for a few dozen images here).
    """
    evals, evecs = torch.linalg.eigh(gram)
    cutoff = evals.amax(-1, keepdim=True).clamp_min(0) * (gram.shape[-1] * torch.finfo(gram.dtype).eps * 10)
    inv = torch.where(evals > cutoff, 1 / evals.clamp_min(torch.finfo(gram.dtype).tiny), torch.zeros_like(evals))
    return (evecs * inv[..., None, :]) @ evecs.mT


def _lstsq_left(env: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``argmin_C ||env @ C - target||`` for ``env (B, m, d)``, ``target (B, m, n)`` (minimum norm).

    Normal equations with the Gram pseudo-inverse: ``d`` is small and the environments are products of
    near-isometric cores, so squaring the condition number costs nothing measurable in float64.
    """
    return _gram_pinv(env.mT @ env) @ (env.mT @ target)


def _lstsq_right(mid: torch.Tensor, env: torch.Tensor) -> torch.Tensor:
    """``argmin_C ||C @ env - mid||`` for ``env (B, d, n)``, ``mid (B, m, n)`` (minimum norm)."""
    return (mid @ env.mT) @ _gram_pinv(env @ env.mT)


def _refit_term(
    target: torch.Tensor, site_dims: Sequence[int], bond_dims: Sequence[int], scheme: str
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Quantisation-aware TT-SVD of ``target (B, N)`` (site order): codes, scales and dequantised cores."""
    b = target.shape[0]
    full = _full(bond_dims)
    n = len(site_dims)
    env = target.new_ones(b, 1, 1)  # contraction of the quantised cores so far, (B, J_<k, d_{k-1})
    codes, scales, deq = [], [], []
    for k in range(n):
        left = env.shape[1]
        rest = target.shape[1] // left
        remainder = _lstsq_left(env, target.reshape(b, left, rest))  # (B, d_{k-1}, rest)
        if k < n - 1:
            mat = remainder.reshape(b, full[k] * site_dims[k], rest // site_dims[k])
            core = _top_left_vectors(mat, full[k + 1]).reshape(b, full[k], site_dims[k], full[k + 1])
        else:
            core = remainder.reshape(b, full[k], site_dims[k], 1)
        c, s = _quantize_core(core, scheme, last=k == n - 1)
        d = _dequantize_core(c, s, scheme).to(target.dtype)
        codes.append(c)
        scales.append(s)
        deq.append(d)
        env = (env @ d.reshape(b, full[k], -1)).reshape(b, left * site_dims[k], full[k + 1])
    return codes, scales, deq


def _als_sweep(
    target: torch.Tensor, codes, scales, deq, site_dims: Sequence[int], bond_dims: Sequence[int], scheme: str
) -> None:
    """One left-to-right sweep: every core re-solved by least squares against the quantised others, re-quantised,
    kept per image only where the reconstruction error drops. Updates the lists in place."""
    b = target.shape[0]
    full = _full(bond_dims)
    n = len(site_dims)
    err = (_engine._contract_torch(deq) - target).square().sum(1)
    for k in range(n):
        left_env = target.new_ones(b, 1, 1)
        for core in deq[:k]:
            left_env = (left_env @ core.reshape(b, core.shape[1], -1)).reshape(b, -1, core.shape[-1])
        right_env = target.new_ones(b, 1, 1)
        for core in reversed(deq[k + 1 :]):
            right_env = (core.reshape(b, -1, core.shape[-1]) @ right_env).reshape(b, core.shape[1], -1)
        jl, jr = left_env.shape[1], right_env.shape[2]
        tgt = target.reshape(b, jl, site_dims[k] * jr)
        mid = _lstsq_left(left_env, tgt).reshape(b, full[k] * site_dims[k], jr)  # (B, d j, J_>k)
        core = _lstsq_right(mid, right_env).reshape(b, full[k], site_dims[k], full[k + 1])
        c, s = _quantize_core(core, scheme, last=k == n - 1)
        d = _dequantize_core(c, s, scheme).to(target.dtype)
        trial = list(deq)
        trial[k] = d
        new_err = (_engine._contract_torch(trial) - target).square().sum(1)
        better = new_err < err
        shape = (-1, 1, 1, 1)
        codes[k] = torch.where(better.view(shape), c, codes[k])
        scales[k] = torch.where(better, s, scales[k])
        deq[k] = torch.where(better.view(shape), d, deq[k])
        err = torch.where(better, new_err, err)


def quantize_refit(
    x_sites: torch.Tensor,
    site_dims: Sequence[int],
    bond_dims: Sequence[int],
    terms: int = 1,
    scheme: str = "int8",
    *,
    sweeps: int = 0,
) -> QuantizedCores:
    """Quantisation-aware MPS of images: TT-SVD with every core quantised inside the sweep, then ALS sweeps.

    Each core is fitted to what the already quantised cores on its left leave (least squares against their
    contraction, then the leading singular vectors), so the last core absorbs the quantisation error of all
    the others. Every residual term decomposes what the quantised earlier terms left. ``sweeps`` ALS sweeps
    then re-solve each core against the quantised others and keep it per image only where the error drops
    (the integer grid is kept throughout). Integer schemes only gain from this; float schemes fall back to
    a plain TT-SVD and rounding.

    Args:
        x_sites: Images in site order ``(B, prod(site_dims))`` (``Layout.to_sites``), any float or uint8 dtype.
        site_dims: Site dimensions.
        bond_dims: Bond dimensions (tight).
        terms: 1 + the number of residual terms.
        scheme: One of :data:`SCHEMES`.
        sweeps: ALS sweeps after the quantised TT-SVD.

    Returns:
        The stored form, as :func:`quantize`.

    Example:
        >>> import torch
        >>> from mpsdata import _engine
        >>> import numpy as np
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.rand(4, 64, generator=g, dtype=torch.float64) * 255
        >>> plain = quantize(_engine.encode(x, np.arange(64), [4, 4, 4], [4, 4], dtype=torch.float64).cores,
        ...                  [4, 4, 4], [4, 4], "int4")
        >>> refit = quantize_refit(x, [4, 4, 4], [4, 4], scheme="int4", sweeps=1)
        >>> def err(q): return (_engine.decode(q.dequantize(), np.arange(64), [4, 4, 4], [4, 4]) - x).norm()
        >>> bool(err(refit) < err(plain))
        True
    """
    scheme = _check_scheme(scheme)
    if x_sites.ndim != 2 or x_sites.shape[1] != math.prod(site_dims):
        raise ValueError(
            f"x_sites must have shape (B, {math.prod(site_dims)}) for site dims {list(site_dims)}, "
            f"got {tuple(x_sites.shape)}"
        )
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps must be an int >= 0, got {sweeps!r}")
    bond_dims = tuple(int(d) for d in bond_dims)
    if bond_dims != _budget.tighten(bond_dims, site_dims):
        raise ValueError(f"bonds {list(bond_dims)} are not tight for site dims {list(site_dims)}; use _budget.tighten")
    b = x_sites.shape[0]
    if scheme in ("float32", "float16") or b == 0:
        packed = _engine.encode(
            x_sites.to(torch.float64), np.arange(x_sites.shape[1]), site_dims, bond_dims, terms=terms,
            dtype=torch.float64, tails=False,
        ).cores  # fmt: skip
        return quantize(packed, site_dims, bond_dims, scheme)
    # Environments are (B, pixels, bond): chunk the batch to keep them near 32 MB.
    chunk = max(1, (1 << 22) // (x_sites.shape[1] * max(bond_dims)))
    parts = [_refit_chunk(x_sites[i : i + chunk].to(torch.float64), site_dims, bond_dims, terms, scheme, sweeps)
             for i in range(0, b, chunk)]  # fmt: skip
    values = torch.cat([p[0] for p in parts])
    scales = torch.cat([p[1] for p in parts])
    return QuantizedCores(values, scales, scheme, tuple(int(j) for j in site_dims), bond_dims)


def _refit_chunk(target, site_dims, bond_dims, terms, scheme, sweeps) -> tuple[torch.Tensor, torch.Tensor]:
    b = target.shape[0]
    all_codes, all_scales, all_deq = [], [], []
    residual = target
    for _ in range(terms):
        codes, scales, deq = _refit_term(residual, site_dims, bond_dims, scheme)
        all_codes.append(codes)
        all_scales.append(scales)
        all_deq.append(deq)
        residual = residual - _engine._contract_torch(deq)
    for _ in range(sweeps):
        for t in range(terms):
            others = sum(
                (_engine._contract_torch(all_deq[u]) for u in range(terms) if u != t), torch.zeros_like(target)
            )
            _als_sweep(target - others, all_codes[t], all_scales[t], all_deq[t], site_dims, bond_dims, scheme)
    packed = torch.stack([torch.cat([c.reshape(b, -1) for c in term], -1) for term in all_codes], 1)
    term_scales = torch.stack([torch.stack(term, -1) for term in all_scales], 1)
    return (_pack_int4(packed) if scheme == "int4" else packed), term_scales


def quantize_mps(m, scheme: str = "int8", *, x: torch.Tensor | np.ndarray | None = None, sweeps: int = 0):
    """Quantise an :class:`mpsdata.MPS`; with the original images ``x``, refit (see :func:`quantize_refit`).

    Args:
        m: What :func:`mpsdata.decompose` returned.
        scheme: One of :data:`SCHEMES`.
        x: The images ``m`` was made from (same shape); enables the quantisation-aware refit.
        sweeps: ALS sweeps of the refit (needs ``x``).

    Returns:
        :class:`QuantizedCores` with one row per MPS (``prod(m.batch_shape)`` rows).

    Example:
        >>> import torch, mpsdata
        >>> x = torch.arange(64.0).reshape(8, 8)
        >>> m = mpsdata.decompose(x[None], bond_dims=[2, 2], site_dims=[4, 4, 4])
        >>> q = quantize_mps(m, "int8", x=x[None])
        >>> q.nbytes.tolist(), bool((reconstruct(q, m.layout)[0] - x).abs().max() < 0.5)  # 32 values + 8 scale bytes
        ([40], True)
    """
    if x is None:
        if sweeps:
            raise ValueError("sweeps > 0 needs the original images: pass x")
        return quantize(m._packed, m.site_dims, m.bond_dims, scheme)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    sites = m.layout.to_sites(x.to(m.device)).reshape(-1, math.prod(m.site_dims))
    return quantize_refit(sites, m.site_dims, m.bond_dims, m.terms, scheme, sweeps=sweeps)


def reconstruct(q: QuantizedCores, layout, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode :class:`QuantizedCores` through a layout: ``(B, [C,] H, W)`` floats, or uint8 with ``torch.uint8``."""
    flat = _engine.decode(q.dequantize(), layout.scatter_index, q.site_dims, q.bond_dims, quantize=dtype == torch.uint8)
    image = (layout.channels, layout.height, layout.width)
    return flat.reshape(flat.shape[0], *image[3 - layout.image_dims :])


# ---------------------------------------------------------------------------------------------------
# Layout, colour and domain search at a byte budget
def _candidate_sites(height: int, width: int) -> list:
    """Site specs worth trying: the default, both families, the plain matrix, and row-major chains of 3 and 4 sites."""
    from ._layout import _balanced_sites, _prime_factors

    specs: list = [None, "hierarchical", "row", [height, width]]  # None: the default layout, first among ties
    factors = _prime_factors(height * width)
    for n in (3, 4):
        if len(factors) >= n:
            specs.append(list(_balanced_sites(factors, n)))
    return specs


def apply_layout(
    images: torch.Tensor,
    bytes_ratio: float,
    scheme: str = "int8",
    *,
    site_dims=None,
    colour: str = "rgb",
    luma_share: float | None = None,
    domain: str = "pixels",
) -> tuple[torch.Tensor, int, list[tuple[int, ...]]]:
    """Quantised per-image MPS of images at a byte budget with one layout, colour and domain choice.

    A thin wrapper of :func:`mpsdata.decompose` (the one implementation of every option) that names the colour
    handling the way the search does and returns what it scores.

    Args:
        images: ``(N, C, H, W)`` (``C`` 1 or 3) or ``(N, H, W)`` uint8 images.
        bytes_ratio: Stored bytes (all channels) over raw uint8 bytes ``C H W``.
        scheme: One of :data:`SCHEMES` (``decompose``'s ``core_dtype``).
        site_dims: Site spec, as ``decompose``'s.
        colour: ``"rgb"`` (a channel per MPS, equal bytes), ``"rgb-site"`` (the channel as the last site) or
            ``"ycc"`` (orthonormal luma/chroma, a channel per MPS, luma taking ``luma_share`` of the bytes);
            gray images ignore it (``"gray"`` names that).
        luma_share: Fraction of the bytes for luma with ``"ycc"`` (default ``decompose``'s).
        domain: ``"pixels"`` or ``"dct"`` (orthonormal 2-D DCT of every channel first).

    Returns:
        ``(uint8 reconstructions like images, bytes per image, bonds per MPS channel)``.

    Raises:
        ValueError: the budget cannot hold the smallest MPS of this layout, or a bad option.

    Example:
        >>> x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
        >>> rec, nbytes, bonds = apply_layout(x, 0.6, site_dims=[8, 8], colour="ycc")
        >>> rec.shape, nbytes, bonds  # luma gets 0.6 of the 115 bytes, each chroma plane 0.2
        (torch.Size([2, 3, 8, 8]), 98, [(3,), (1,), (1,)])
    """
    from ._mps import decompose

    scheme = _check_scheme(scheme)
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    squeeze = x.ndim == 3
    if squeeze:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W) with C 1 or 3, got {tuple(x.shape)}")
    if colour not in ("rgb", "rgb-site", "ycc", "gray"):
        raise ValueError(f"colour must be 'rgb', 'rgb-site', 'ycc' or 'gray', got {colour!r}")
    c = x.shape[1]
    if c == 1:
        colour = "rgb"
    mode: ChannelMode = "site" if colour == "rgb-site" else "separate"
    m = decompose(
        x if c == 3 or mode == "site" else x[:, 0], bytes_ratio=bytes_ratio, core_dtype=scheme, site_dims=site_dims,
        channel_mode=mode, colour="ycc" if colour == "ycc" else "rgb", domain=domain,
        luma_share=luma_share if colour == "ycc" else None, compute_bound=False,
    )  # fmt: skip
    out = m.reconstruct(torch.uint8).reshape(x.shape)
    per_mps = m.nbytes.reshape(-1, 1 if mode == "site" else c)
    planes = 1 if mode == "site" else c
    bonds_all = [m.bond_dims] + [m.chroma_bond_dims or m.bond_dims] * (planes - 1)
    nbytes = int(per_mps[0].sum()) if per_mps.shape[0] else sum(
        nbytes_per_image(m.site_dims, b, m.terms, scheme) for b in bonds_all)  # fmt: skip
    return (out[:, 0] if squeeze else out), nbytes, bonds_all


def search_layout(
    sample_images: torch.Tensor | np.ndarray,
    bytes_ratio: float,
    scheme: str = "int8",
    *,
    site_dims: Sequence | None = None,
    colours: Sequence[str] | None = None,
    luma_shares: Sequence[float] = (0.5, 0.7),
    domains: Sequence[str] = ("pixels", "dct"),
) -> dict[str, Any]:
    """Find the per-image MPS layout, colour handling and domain with the best PSNR at a byte budget.

    Every candidate is decomposed by :func:`mpsdata.decompose` (through :func:`apply_layout`) at bonds that keep
    the stored bytes (:func:`nbytes_per_image`, all channels) within ``bytes_ratio`` of the raw uint8 image,
    decoded to uint8 and scored by PSNR (mean over the sample). Provably equivalent candidates are skipped: the
    2-D DCT ``D X D^T`` of the 2-site ``[H, W]`` layout is a local unitary on its two sites (same singular values
    at every bond as the pixels), so that layout is tried in the pixel domain only; luma/chroma with the channel
    as a site (a local unitary on the channel site) is not a candidate, ``"rgb-site"`` stands for it.

    Args:
        sample_images: ``(N, H, W)`` or ``(N, C, H, W)`` uint8 images (a few dozen are plenty).
        bytes_ratio: Stored bytes over raw uint8 bytes ``C H W``.
        scheme: One of :data:`SCHEMES`.
        site_dims: Candidate site specs (as ``decompose``'s ``site_dims``); default the default layout (``None``),
            both families, the plain ``[H, W]`` matrix and row-major chains of 3 and 4 balanced sites.
        colours: For colour images, among ``"rgb"``, ``"rgb-site"`` and ``"ycc"`` (see :func:`apply_layout`);
            default all three.
        luma_shares: Fractions of the byte budget tried for luma with ``"ycc"``.
        domains: ``"pixels"`` and/or ``"dct"``.

    Returns:
        ``{"best": dict, "candidates": [dict, ...]}``; each dict holds ``site_dims`` (the spec, ready for
        ``decompose`` and :func:`apply_layout`), ``layout`` (resolved site dims), ``colour``, ``luma_share``,
        ``domain``, ``bond_dims`` (per MPS channel), ``bytes_ratio`` (achieved) and ``psnr``.

    Raises:
        ValueError: no candidate fits the budget.

    Example:
        >>> import torch
        >>> ramp = (torch.arange(8)[:, None] * 8 + torch.arange(8)).to(torch.uint8)
        >>> x = torch.stack([ramp, ramp.T, 255 - ramp])
        >>> found = search_layout(x, 0.6, "int8", domains=("pixels",))
        >>> found["best"]["bytes_ratio"] <= 0.6, found["best"]["psnr"] > 30
        (True, True)
    """
    from ._layout import make_layout

    scheme = _check_scheme(scheme)
    x = sample_images
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sample_images must be a tensor or array, got {type(sample_images).__name__}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"sample_images must be (N, H, W) or (N, C, H, W) with C 1 or 3, got {tuple(x.shape)}")
    n, c, h, w = x.shape
    specs = list(site_dims) if site_dims is not None else _candidate_sites(h, w)
    if c == 1:
        colour_options: list[tuple[str, float | None]] = [("rgb", None)]
    else:
        wanted = colours if colours is not None else ("rgb", "rgb-site", "ycc")
        colour_options = [(col, None) for col in wanted if col != "ycc"]
        if "ycc" in wanted:
            colour_options += [("ycc", s) for s in luma_shares]
    results = []
    seen: set = set()
    for spec in specs:
        for colour, share in colour_options:
            mode: ChannelMode = "site" if colour == "rgb-site" else "separate"
            try:
                layout = make_layout(h, w, c if mode == "site" else 1, spec, mode)
            except (TypeError, ValueError):
                continue
            if (layout, colour, share) in seen:  # two specs naming one layout
                continue
            seen.add((layout, colour, share))
            matrix = layout.kind == "row" and tuple(layout.spatial_sites) == (h, w)  # the DCT is a local unitary
            for domain in [d for d in domains if not (matrix and d == "dct" and "pixels" in domains)]:
                try:
                    rec, nbytes, bonds_all = apply_layout(x, bytes_ratio, scheme, site_dims=spec, colour=colour,
                                                          luma_share=share, domain=domain)  # fmt: skip
                except ValueError:
                    continue  # this layout cannot meet the budget
                results.append({
                    "site_dims": spec, "layout": layout.site_dims, "colour": colour if c == 3 else "gray",
                    "luma_share": share, "domain": domain, "bond_dims": bonds_all,
                    "bytes_ratio": nbytes / (c * h * w), "psnr": float(psnr(rec, x).mean()),
                })  # fmt: skip
    if not results:
        raise ValueError(
            f"no layout meets bytes_ratio {bytes_ratio} with scheme {scheme!r} on {c}x{h}x{w} images; "
            "raise the budget or use a smaller scheme (int4)"
        )
    return {"best": max(results, key=lambda r: r["psnr"]), "candidates": results}
