"""Baselines the paper compares with, usable on their own: low-rank factorisations, codecs and coresets.

Every reconstruction method takes a batch of images (a tensor ``(N, H, W)`` or ``(N, C, H, W)``, uint8 or
float) and returns a :class:`BaselineResult` with the reconstructions in the input's shape and dtype, the
paper's parameter ratio per image where it applies, and the bytes each image takes when stored:

* :func:`ice`: Latorre 2005, "Image compression and entanglement": pixels addressed hierarchically (each
  site one quadrant level, row and column digits interleaved coarse to fine), one MPS truncated once,
  optionally after a 2-D DCT or a real form of the DFT;
* :func:`svd`, :func:`cp`, :func:`tucker`: per-image truncated SVD of every channel, and CP (Hitchcock
  1927) and Tucker (Tucker 1966) decompositions per image with TensorLy (an optional dependency);
* :func:`downsample_upsample`: area downsampling to the pixel budget, then bicubic or bilinear upsampling;
* :func:`jpeg`, :func:`webp`, :func:`avif`: Pillow's codecs at a quality or a byte budget.

Factor methods are budgeted by the paper's ratio ``rho`` (parameters kept over values of the image) and
count their parameters as float32 (4 bytes each), so their bytes are ``4 * rho`` times the raw uint8 bytes.
Coresets choose samples instead of compressing them: :func:`random_coreset` and :func:`k_center_coreset`
return indices into the dataset, with ``ratio`` the fraction of samples kept.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import _budget
from ._engine import _contract_torch
from ._mps import _all_finite, _check_int, _check_number, decompose
from ._signal import dct2
from ._typing import SiteDims

__all__ = [
    "BaselineResult",
    "avif",
    "cp",
    "downsample_upsample",
    "ice",
    "jpeg",
    "k_center_coreset",
    "random_coreset",
    "svd",
    "tucker",
    "webp",
]

_FLOAT32_BYTES = 4  # factor methods store their parameters as float32


@dataclass(frozen=True, repr=False)
class BaselineResult:
    """What a baseline made of a batch of images.

    Attributes:
        images: Reconstructions, the input's shape, dtype and device (uint8 input gives rounded uint8).
        ratio: The paper's parameter ratio per image, ``(N,)`` float64 (values stored over values of the
            image), or ``None`` where it does not apply (codecs).
        nbytes: Bytes stored per image, ``(N,)`` int64: float32 parameters for factor methods, the encoded
            file for codecs, the small image at the input's dtype for :func:`downsample_upsample`.
        method: Short description, e.g. ``"svd rank 5"``.
        settings: What the budget resolved to: ranks, bond dims, the small size, or per-image qualities.
    """

    images: torch.Tensor
    ratio: torch.Tensor | None
    nbytes: torch.Tensor
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_ratio(self) -> torch.Tensor:
        """``nbytes`` over the bytes of the raw uint8 image (``C * H * W``), ``(N,)`` float64."""
        raw = math.prod(self.images.shape[1:])
        return self.nbytes.to(torch.float64) / raw

    def __repr__(self) -> str:
        shape = tuple(self.images.shape)
        if self.ratio is None:
            ratio = "None"
        else:
            ratio = f"{self.ratio.max().item():.4f}" if self.ratio.numel() else "n/a"
        nbytes = f"{self.nbytes.double().mean().item():.1f}" if self.nbytes.numel() else "n/a"
        return (
            f"BaselineResult(method={self.method!r}, images={shape} {self.images.dtype}, ratio={ratio}, "
            f"mean nbytes={nbytes})"
        )


# -- factor methods ---------------------------------------------------------------------------------------


def _factor_result(
    images: torch.Tensor, n: int, params: int, values: int, method: str, settings: dict[str, Any]
) -> BaselineResult:
    """The result of a factor method: ``params`` float32 numbers stored per image of ``values`` values."""
    return BaselineResult(
        images,
        torch.full((n,), params / values, dtype=torch.float64),
        torch.full((n,), params * _FLOAT32_BYTES, dtype=torch.int64),
        method,
        settings,
    )


def ice(
    x: torch.Tensor,
    ratio: float | None = None,
    *,
    bytes_ratio: float | None = None,
    max_bond: int | None = None,
    transform: Literal["dct", "dft"] | None = None,
    site_dims: SiteDims = "hierarchical",
) -> BaselineResult:
    """ICE (Latorre 2005): one hierarchically addressed MPS per channel, truncated once.

    Every channel is optionally transformed, laid out on hierarchical sites (site ``k`` holds the ``k``-th
    row digit and the ``k``-th column digit of a pixel, coarse to fine, so each site refines a quadrant),
    decomposed by TT-SVD (:func:`mpsdata.decompose`) with one term and no residual, reconstructed, and
    transformed back. The seed paper describes ICE with a discrete cosine transform; Latorre offers a
    Fourier transform as an improvement.

    Args:
        x: Images ``(N, H, W)`` or ``(N, C, H, W)``, uint8 or float.
        ratio: The paper's ratio in ``(0, 1]``; solved into bond dimensions that never exceed it.
        bytes_ratio: Instead of ``ratio``, a byte budget over the raw uint8 bytes; the factors are float32, so
            it is ``4 * ratio`` (``bytes_ratio=0.4`` is ``ratio=0.1``).
        max_bond: Instead of ``ratio``, cap every bond at this value (Latorre's ``chi``); a cap at least as
            large as every bond keeps the image exactly, at a ratio that may exceed 1.
        transform: ``None`` (pixels), ``"dct"`` (orthonormal 2-D DCT-II of every channel) or ``"dft"``: the
            2-D discrete Hartley transform ``Re F - Im F`` of the orthonormal DFT ``F``. It is real,
            orthogonal and its own inverse, and holds the DFT's information in ``H * W`` real values
            (``|F(u, v)|^2 = (h(u, v)^2 + h(-u, -v)^2) / 2``), so the budget counts the same values as for
            pixels; storing real and imaginary parts instead would double them.
        site_dims: Site layout passed to :func:`mpsdata.decompose`; ``"hierarchical"`` is Latorre's.

    Returns:
        The reconstructions; ``ratio`` and ``nbytes`` (float32 cores) per image; ``settings`` holds
        ``bond_dims`` and ``site_dims``.

    Raises:
        TypeError: ``x`` is not a uint8 or float tensor.
        ValueError: a bad shape, both or neither budget, a ratio too small for the sites, or an unknown
            transform.

    Example:
        >>> import torch
        >>> from mpsdata import baselines
        >>> x = torch.arange(128.0).reshape(2, 8, 8)
        >>> r = baselines.ice(x, ratio=0.5)
        >>> r.images.shape, r.settings["bond_dims"], r.ratio
        (torch.Size([2, 8, 8]), (2, 2), tensor([0.5000, 0.5000], dtype=torch.float64))
        >>> r.nbytes  # 4 * 2 + 2 * 4 * 2 + 2 * 4 = 32 float32 parameters
        tensor([128, 128])
        >>> torch.allclose(r.images, x, atol=1e-3)  # a ramp has bond dimension 2
        True
        >>> baselines.ice(x, max_bond=64, transform="dct").images.sub(x).abs().max() < 1e-3  # no truncation
        tensor(True)
    """
    imgs = _images(x)
    if (ratio is None) + (max_bond is None) + (bytes_ratio is None) != 2:
        raise ValueError(
            "give exactly one budget, ratio, bytes_ratio or max_bond; got "
            f"ratio={ratio!r}, bytes_ratio={bytes_ratio!r}, max_bond={max_bond!r}"
        )
    if bytes_ratio is not None:
        ratio = _factor_ratio(None, bytes_ratio)
    if transform not in (None, "dct", "dft"):
        raise ValueError(f"transform must be None, 'dct' or 'dft', got {transform!r}")
    n, c, h, w = imgs.shape
    # Factorise in float64: the engine's float32 path squares the condition number (Gram matrices) and
    # misses uint8 pixels by ~1 level even untruncated; the stored cores are then rounded to float32.
    coeffs = _transform(imgs.to(torch.float64), transform)
    m = decompose(coeffs, ratio, max_bond=max_bond, site_dims=site_dims, dtype=torch.float64, compute_bound=False)
    if n:  # MPS.cores cannot shape an empty batch
        cores = [core.reshape(n * c, *core.shape[-3:]).to(torch.float32) for core in m.cores]  # one term
        rec = _transform(m.layout.from_sites(_contract_torch(cores)).to(torch.float64), transform, inverse=True)
    else:
        rec = coeffs
    params = c * _budget.num_params(m.bond_dims, m.site_dims)  # stored slots, the same for every image
    name = "ice" if transform is None else f"ice+{transform}"
    return _factor_result(
        _like(rec, x),
        n,
        params,
        c * h * w,
        f"{name} bonds {list(m.bond_dims)}",
        {"bond_dims": m.bond_dims, "site_dims": m.site_dims, "transform": transform},
    )


def svd(x: torch.Tensor, ratio: float | None = None, *, bytes_ratio: float | None = None) -> BaselineResult:
    """Truncated SVD of every channel's ``H x W`` matrix (Eckart-Young: the best rank-``r`` approximation).

    The rank is the largest ``r`` with ``r * (H + W) <= ratio * H * W``: the singular values are folded into
    the left factor, so ``r`` columns of ``H`` and ``r`` rows of ``W`` values are stored (as float32).

    Args:
        x: Images ``(N, H, W)`` or ``(N, C, H, W)``, uint8 or float.
        ratio: The paper's ratio in ``(0, 1]``.
        bytes_ratio: Instead of ``ratio``, a byte budget over the raw uint8 bytes; the factors are float32, so
            it is ``4 * ratio`` (``bytes_ratio=0.4`` is ``ratio=0.1``).

    Returns:
        The reconstructions, with ``settings["rank"]``.

    Raises:
        TypeError: ``x`` is not a uint8 or float tensor.
        ValueError: a bad shape, or a ratio outside ``(0, 1]`` or below ``(H + W) / (H * W)`` (rank 1).

    Example:
        >>> import torch
        >>> from mpsdata import baselines
        >>> x = torch.arange(64.0).reshape(1, 8, 8)
        >>> r = baselines.svd(x, ratio=0.5)
        >>> r.settings["rank"], r.ratio, r.nbytes
        (2, tensor([0.5000], dtype=torch.float64), tensor([128]))
        >>> baselines.svd(x, bytes_ratio=2.0).nbytes  # 2 bytes per pixel value: the same rank-2 factors
        tensor([128])
        >>> torch.allclose(r.images, x, atol=1e-3)
        True
    """
    imgs = _images(x)
    ratio = _factor_ratio(ratio, bytes_ratio)
    n, c, h, w = imgs.shape
    rank = min(math.floor(ratio * h * w / (h + w) + 1e-9), h, w)
    if rank < 1:
        raise ValueError(
            f"ratio {ratio} is too small for a rank-1 SVD of {h}x{w} channels: it needs "
            f"ratio >= (H + W) / (H W) = {(h + w) / (h * w):.4f}"
        )
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(imgs.to(compute), full_matrices=False)
    left = (u[..., :rank] * s[..., None, :rank]).to(torch.float32)  # what is stored
    right = vh[..., :rank, :].to(torch.float32)
    params = c * rank * (h + w)
    return _factor_result(_like(left @ right, x), n, params, c * h * w, f"svd rank {rank}", {"rank": rank})


def cp(
    x: torch.Tensor, ratio: float | None = None, *, bytes_ratio: float | None = None, n_iter_max: int = 100
) -> BaselineResult:
    """CP decomposition (Hitchcock 1927) of every image with TensorLy's ``parafac`` (ALS, SVD start).

    A gray image is an ``H x W`` matrix, a colour image an ``H x W x C`` tensor. The rank is the largest
    ``R`` with ``R * (H + W [+ C]) <= ratio * values``: the weights are folded into the first factor. On gray
    images CP is a rank-``R`` matrix factorisation, so it matches :func:`svd` at the same budget.

    Args:
        x: Images ``(N, H, W)`` or ``(N, C, H, W)``, uint8 or float.
        ratio: The paper's ratio in ``(0, 1]``.
        bytes_ratio: Instead of ``ratio``, a byte budget over the raw uint8 bytes; the factors are float32, so
            it is ``4 * ratio`` (``bytes_ratio=0.4`` is ``ratio=0.1``).
        n_iter_max: ALS iterations per image.

    Returns:
        The reconstructions (from float32 factors), with ``settings["rank"]``.

    Raises:
        ImportError: TensorLy is not installed.
        TypeError: ``x`` is not a uint8 or float tensor.
        ValueError: a bad shape, or a ratio outside ``(0, 1]`` or too small for rank 1.

    Example:
        >>> import torch
        >>> from mpsdata import baselines
        >>> x = torch.arange(64.0).reshape(1, 8, 8)
        >>> r = baselines.cp(x, ratio=0.5)
        >>> r.settings["rank"], r.ratio
        (2, tensor([0.5000], dtype=torch.float64))
        >>> torch.allclose(r.images, x, atol=1e-2)
        True
    """
    tl, decomposition = _tensorly()
    imgs = _images(x)
    ratio = _factor_ratio(ratio, bytes_ratio)
    n_iter_max = _check_int("n_iter_max", n_iter_max, 1)
    n, c, h, w = imgs.shape
    dims = (h, w) if c == 1 else (h, w, c)
    rank = math.floor(ratio * c * h * w / sum(dims) + 1e-9)
    if rank < 1:
        raise ValueError(
            f"ratio {ratio} is too small for a rank-1 CP of {'x'.join(map(str, dims))} images: it needs "
            f"ratio >= {sum(dims) / (c * h * w):.4f}"
        )
    data = _as_numpy_hwc(imgs)
    out = np.empty(data.shape, np.float32)
    with warnings.catch_warnings():
        # A rank above a mode's size makes TensorLy pad the SVD start with random columns, and say so.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs", category=UserWarning)
        for i, image in enumerate(data):
            weights, factors = decomposition.parafac(
                tl.tensor(image.reshape(dims)), rank, n_iter_max=n_iter_max, init="svd", random_state=0
            )
            stored = [np.asarray(f, np.float32) for f in factors]
            stored[0] = stored[0] * np.asarray(weights, np.float32)
            out[i] = _cp_contract(stored).reshape(image.shape)
    params = rank * sum(dims)
    return _factor_result(_like(_from_numpy_hwc(out), x), n, params, c * h * w, f"cp rank {rank}", {"rank": rank})


def tucker(
    x: torch.Tensor, ratio: float | None = None, *, bytes_ratio: float | None = None, n_iter_max: int = 100
) -> BaselineResult:
    """Tucker decomposition (Tucker 1966) of every image with TensorLy's ``tucker`` (HOOI, HOSVD start).

    A gray image is an ``H x W`` matrix, a colour image an ``H x W x C`` tensor. Parameters are the core and
    the factors, ``prod(r) + sum(dim_k r_k)``. The ranks are chosen from the budget alone: the largest core
    (``prod(r)``) whose parameters fit, with no rank above the product of the others (a larger one would only
    store zeros), fewer parameters breaking ties.

    Args:
        x: Images ``(N, H, W)`` or ``(N, C, H, W)``, uint8 or float.
        ratio: The paper's ratio in ``(0, 1]``.
        bytes_ratio: Instead of ``ratio``, a byte budget over the raw uint8 bytes; the factors are float32, so
            it is ``4 * ratio`` (``bytes_ratio=0.4`` is ``ratio=0.1``).
        n_iter_max: HOOI iterations per image.

    Returns:
        The reconstructions (from float32 core and factors), with ``settings["ranks"]``.

    Raises:
        ImportError: TensorLy is not installed.
        TypeError: ``x`` is not a uint8 or float tensor.
        ValueError: a bad shape, or a ratio outside ``(0, 1]`` or too small for ranks 1.

    Example:
        >>> import torch
        >>> from mpsdata import baselines
        >>> x = torch.arange(64.0).reshape(1, 8, 8)
        >>> r = baselines.tucker(x, ratio=0.6)
        >>> r.settings["ranks"], r.ratio  # 2 * 2 + 8 * 2 + 8 * 2 = 36 parameters
        ((2, 2), tensor([0.5625], dtype=torch.float64))
        >>> torch.allclose(r.images, x, atol=1e-3)
        True
        >>> baselines.tucker(x, ratio=0.5).settings["ranks"]  # 36 > 32: ranks (1, 2) would store zeros
        (1, 1)
    """
    tl, decomposition = _tensorly()
    imgs = _images(x)
    ratio = _factor_ratio(ratio, bytes_ratio)
    n_iter_max = _check_int("n_iter_max", n_iter_max, 1)
    n, c, h, w = imgs.shape
    dims = (h, w) if c == 1 else (h, w, c)
    ranks = _tucker_ranks(dims, ratio * c * h * w)
    data = _as_numpy_hwc(imgs)
    out = np.empty(data.shape, np.float32)
    for i, image in enumerate(data):
        core, factors = decomposition.tucker(
            tl.tensor(image.reshape(dims)), list(ranks), n_iter_max=n_iter_max, init="svd", random_state=0
        )
        stored = np.asarray(core, np.float32)
        for mode, f in enumerate(factors):
            stored = np.moveaxis(np.tensordot(np.asarray(f, np.float32), stored, axes=(1, mode)), 0, mode)
        out[i] = stored.reshape(image.shape)
    params = math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks, strict=True))
    return _factor_result(
        _like(_from_numpy_hwc(out), x), n, params, c * h * w, f"tucker ranks {list(ranks)}", {"ranks": ranks}
    )


def downsample_upsample(
    x: torch.Tensor, ratio: float, *, mode: Literal["bicubic", "bilinear"] = "bicubic"
) -> BaselineResult:
    """Store a smaller image (area downsampling), show it upsampled back to the original size.

    Every small pixel is the mean of the area it covers, fractional pixels weighted by their overlap (as
    Pillow's ``BOX`` filter; torch's ``"area"`` mode uses whole-pixel windows and blurs non-integer factors
    more). The small size ``h x w`` keeps the aspect ratio and the most pixels with ``h * w <= ratio * H * W``. The
    small image is stored at the input's dtype (uint8 input: rounded to uint8, one byte per value) and the
    reconstruction is upsampled from exactly what is stored.

    Args:
        x: Images ``(N, H, W)`` or ``(N, C, H, W)``, uint8 or float.
        ratio: Fraction of pixels kept, in ``(0, 1]`` (the paper's ratio: values stored over values).
        mode: Upsampling filter, ``"bicubic"`` or ``"bilinear"`` (``align_corners=False``).

    Returns:
        The reconstructions, with ``settings["size"] = (h, w)``.

    Raises:
        TypeError: ``x`` is not a uint8 or float tensor.
        ValueError: a bad shape, a ratio outside ``(0, 1]`` or below one pixel, or an unknown mode.

    Example:
        >>> import torch
        >>> from mpsdata import baselines
        >>> x = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
        >>> r = baselines.downsample_upsample(x, ratio=0.25)
        >>> r.settings["size"], r.ratio, r.nbytes  # 4 x 4 pixels x 3 uint8 channels
        ((4, 4), tensor([0.2500, 0.2500], dtype=torch.float64), tensor([48, 48]))
        >>> torch.equal(r.images, x)  # a flat image survives
        True
    """
    imgs = _images(x)
    ratio = _check_ratio(ratio)
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    n, c, h, w = imgs.shape
    small = _small_size(h, w, ratio)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows, cols = _area_matrix(small[0], h, imgs.device), _area_matrix(small[1], w, imgs.device)
    stored = _cast(rows.to(compute) @ imgs.to(compute) @ cols.to(compute).mT, x.dtype)
    rec = F.interpolate(stored.to(compute), size=(h, w), mode=mode, align_corners=False)
    values = small[0] * small[1]
    return BaselineResult(
        _like(rec, x),
        torch.full((n,), values / (h * w), dtype=torch.float64),
        torch.full((n,), values * c * x.element_size(), dtype=torch.int64),
        f"downsample {small[0]}x{small[1]} + {mode}",
        {"size": small, "mode": mode},
    )


# -- codecs -----------------------------------------------------------------------------------------------
def jpeg(x: torch.Tensor, quality: int | None = None, *, bytes_ratio: float | None = None) -> BaselineResult:
    """JPEG with Pillow (optimised Huffman tables; Pillow's default 4:2:0 chroma subsampling for colour).

    Args:
        x: Images ``(N, H, W)`` or ``(N, C, H, W)`` with ``C`` 1 or 3; uint8, or float in ``[0, 1]``.
        quality: Encoder quality ``0..100`` for every image.
        bytes_ratio: Instead of ``quality``, a byte budget per image as a fraction of its raw uint8 bytes
            (``C * H * W``): each image gets the highest quality whose file fits (binary search).

    Returns:
        The decoded images (``ratio`` is ``None``; ``nbytes`` is the file size), with
        ``settings["quality"]`` per image.

    Raises:
        TypeError: a wrong dtype or argument type.
        ValueError: a bad shape, range or budget, or a byte budget that an image cannot meet.

    Example:
        >>> import torch
        >>> from mpsdata import baselines
        >>> x = torch.full((1, 16, 16), 128, dtype=torch.uint8)
        >>> r = baselines.jpeg(x, quality=90)
        >>> torch.equal(r.images, x), r.ratio, int(r.nbytes) > 0
        (True, None, True)
    """
    return _codec(x, "JPEG", "jpg", quality, bytes_ratio, {"optimize": True})


def webp(x: torch.Tensor, quality: int | None = None, *, bytes_ratio: float | None = None) -> BaselineResult:
    """Lossy WebP with Pillow (``method=6``, the slowest and smallest); arguments as in :func:`jpeg`.

    Example:
        >>> import torch
        >>> from mpsdata import baselines
        >>> x = torch.full((1, 3, 16, 16), 200, dtype=torch.uint8)
        >>> r = baselines.webp(x, bytes_ratio=0.2)
        >>> bool(r.nbytes <= 0.2 * 3 * 16 * 16), r.images.shape
        (True, torch.Size([1, 3, 16, 16]))
    """
    return _codec(x, "WEBP", "webp", quality, bytes_ratio, {"method": 6})


def avif(x: torch.Tensor, quality: int | None = None, *, bytes_ratio: float | None = None) -> BaselineResult:
    """AVIF with Pillow (needs a Pillow built with AVIF: ``PIL.features.check("avif")``); arguments as in
    :func:`jpeg`. A 28x28 file takes ~330 bytes even at quality 0, too much for tight budgets on tiny images.

    Example:
        >>> import torch
        >>> from mpsdata import baselines
        >>> x = torch.full((2, 16, 16), 0.5)
        >>> r = baselines.avif(x, quality=80)
        >>> r.images.dtype, r.images.sub(x).abs().max().item() < 0.01
        (torch.float32, True)
    """
    return _codec(x, "AVIF", "avif", quality, bytes_ratio, {})


# -- coresets ---------------------------------------------------------------------------------------------
def random_coreset(n: int, ratio: float, seed: int | None = None) -> torch.Tensor:
    """A uniformly random subset of ``n`` samples.

    Args:
        n: Number of samples in the dataset.
        ratio: Fraction of samples kept, in ``(0, 1]``; the subset has ``floor(ratio * n)`` samples.
        seed: Seed of the draw; ``None`` uses torch's global generator.

    Returns:
        Distinct indices, int64 ``(k,)``, in draw order: the first ``k'`` are the subset for a smaller ratio
        with the same seed. Sort them for sequential reading.

    Raises:
        TypeError: ``n`` or ``seed`` is not an int.
        ValueError: ``n < 1``, or a ratio outside ``(0, 1]`` or below one sample.

    Example:
        >>> from mpsdata import baselines
        >>> idx = baselines.random_coreset(10, 0.3, seed=0)
        >>> len(idx), len(set(idx.tolist())), bool((idx < 10).all())
        (3, 3, True)
    """
    n = _check_int("n", n, 1)
    k = _coreset_size(n, ratio)
    return torch.randperm(n, generator=_generator(seed))[:k]


def k_center_coreset(features: torch.Tensor, ratio: float, seed: int | None = None) -> torch.Tensor:
    """Greedy k-center coreset (Gonzalez 1985; Sener & Savarese 2018): farthest-point sampling.

    Starting from a random sample, repeatedly add the sample farthest (Euclidean) from its nearest chosen
    one; the largest such distance is within twice the optimal k-center radius. Runs on the device of
    ``features``; memory is one float copy of the features plus a few ``(n,)`` vectors, never ``n x k``
    distances (60,000 x 784 Fashion-MNIST pixels: 188 MB), and each step is one matrix-vector product.

    Args:
        features: ``(n, ...)`` samples (flattened after the first dim): pixels or learned embeddings, any
            real dtype (computed in float32, or float64 for float64 input).
        ratio: Fraction of samples kept, in ``(0, 1]``; the subset has ``floor(ratio * n)`` samples.
        seed: Seed choosing the first center; ``None`` uses torch's global generator.

    Returns:
        Distinct indices, int64 ``(k,)`` on the CPU, in selection order (every prefix is the greedy coreset of
        its size).

    Raises:
        TypeError: ``features`` is not a real tensor, or ``seed`` is not an int.
        ValueError: no samples, NaN or infinite features, or a ratio outside ``(0, 1]`` or below one sample.

    Example:
        >>> import torch
        >>> from mpsdata import baselines
        >>> points = torch.tensor([[0.0], [0.1], [5.0], [5.1], [10.0]])
        >>> sorted(baselines.k_center_coreset(points, 0.6, seed=0).tolist())
        [0, 2, 4]
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dtype == torch.bool or features.is_complex():
        raise TypeError(f"features must be real numbers, got {features.dtype}")
    if features.ndim < 1 or features.shape[0] < 1:
        raise ValueError(f"features must be (n, ...) with n >= 1, got shape {tuple(features.shape)}")
    n = features.shape[0]
    k = _coreset_size(n, ratio)
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    feats = features.reshape(n, -1).to(compute)
    chunks = range(0, n, 4096)  # work on row chunks: no second (n, d) temporary
    if not all(_all_finite(feats[i : i + 4096]) for i in chunks):
        raise ValueError(f"features (shape {tuple(features.shape)}) contain NaN or infinite values")
    if feats.data_ptr() == features.data_ptr():
        feats = feats.clone()  # centred in place below; never modify the caller's tensor
    feats -= feats.mean(0)  # ||a - b||^2 = |a|^2 - 2 a.b + |b|^2 loses less to rounding near the mean
    sq = torch.empty(n, dtype=compute, device=feats.device)
    for i in chunks:
        part = feats[i : i + 4096]
        sq[i : i + 4096] = (part * part).sum(1)
    nearest = torch.full((n,), math.inf, dtype=compute, device=feats.device)
    chosen = torch.empty(k, dtype=torch.int64)
    center = int(torch.randint(n, (1,), generator=_generator(seed)))
    for i in range(k):
        chosen[i] = center
        # Not torch.addmv: measured 3x slower than mv on CPU.
        dist = torch.mv(feats, feats[center]).mul_(-2).add_(sq).add_(sq[center]).clamp_min_(0)
        torch.minimum(nearest, dist, out=nearest)
        nearest[center] = -1.0  # kept by every later minimum: no sample is chosen twice, even duplicates
        center = int(nearest.argmax())
    return chosen


# -- helpers ----------------------------------------------------------------------------------------------
def _images(x) -> torch.Tensor:
    """Validate a batch and view it as ``(N, C, H, W)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x must be a torch.Tensor of images, got {type(x).__name__}; convert arrays with torch.from_numpy"
        )
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
    if x.ndim not in (3, 4) or x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(
            f"x must be a batch of images (N, H, W) or (N, C, H, W) with H, W >= 1, got shape {tuple(x.shape)}; "
            "add a batch dim to a single image with x[None]"
        )
    if x.ndim == 4 and x.shape[1] < 1:
        raise ValueError(f"x has no channels (shape {tuple(x.shape)}); images need C >= 1")
    if not _all_finite(x):
        raise ValueError(f"x (shape {tuple(x.shape)}) contains NaN or infinite values; clean or clamp them first")
    return x if x.ndim == 4 else x[:, None]


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s shape, dtype and device; uint8 rounds and clamps."""
    return _cast(y.reshape(x.shape).to(x.device), x.dtype)


def _cast(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return y.round().clamp_(0, 255).to(torch.uint8)
    return y.to(dtype)


def _factor_ratio(ratio, bytes_ratio) -> float:
    """The paper's ratio of a factor method from exactly one of ``ratio`` and ``bytes_ratio`` (float32 factors:
    4 bytes per parameter against 1 byte per uint8 pixel value, so ``ratio = bytes_ratio / 4``)."""
    if (ratio is None) == (bytes_ratio is None):
        raise ValueError(
            f"give exactly one budget, ratio or bytes_ratio; got ratio={ratio!r}, bytes_ratio={bytes_ratio!r}"
        )
    if ratio is not None:
        return _check_ratio(ratio)
    value = _check_number("bytes_ratio", bytes_ratio)
    if not 0 < value <= _FLOAT32_BYTES:  # also rejects NaN
        raise ValueError(f"bytes_ratio must be in (0, {_FLOAT32_BYTES}] for float32 factors, got {bytes_ratio}")
    return value / _FLOAT32_BYTES


def _check_ratio(ratio) -> float:
    value = _check_number("ratio", ratio)
    if not 0 < value <= 1:  # also rejects NaN
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return value


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(_check_int("seed", seed, 0))


def _coreset_size(n: int, ratio) -> int:
    ratio = _check_ratio(ratio)
    k = math.floor(ratio * n + 1e-9)
    if k < 1:
        raise ValueError(f"ratio {ratio} keeps no sample of {n}: it needs ratio >= 1/n = {1 / n:.3g}")
    return k


def _transform(x: torch.Tensor, kind: str | None, inverse: bool = False) -> torch.Tensor:
    """Orthonormal 2-D transform of the last two dims: DCT-II (inverse: its transpose) or the Hartley one."""
    if kind is None:
        return x
    if kind == "dft":
        # Discrete Hartley transform: real, orthogonal, its own inverse.
        f = torch.fft.fft2(x, norm="ortho")
        return f.real - f.imag
    return dct2(x, inverse)


def _tensorly():
    try:
        import tensorly
        import tensorly.decomposition
    except ImportError:  # pragma: no cover - exercised only without TensorLy
        raise ImportError(
            "the CP and Tucker baselines need TensorLy: pip install tensorly (or pip install 'mpsdata[baselines]')"
        ) from None
    return tensorly, tensorly.decomposition


def _as_numpy_hwc(imgs: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` -> float64 numpy ``(N, H, W, C)`` (TensorLy's numpy backend)."""
    return imgs.detach().cpu().to(torch.float64).permute(0, 2, 3, 1).numpy()


def _from_numpy_hwc(out: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def _cp_contract(factors: list[np.ndarray]) -> np.ndarray:
    if len(factors) == 2:
        return factors[0] @ factors[1].T
    return np.einsum("ir,jr,kr->ijk", *factors)


def _tucker_ranks(dims: tuple[int, ...], budget: float) -> tuple[int, ...]:
    """The largest core ``prod(r)`` whose Tucker parameters fit ``budget``; fewer parameters break ties.

    Each rank stays within its dimension and within the product of the other ranks (a larger rank makes the
    core's unfolding rank-deficient: its extra factor columns store nothing).
    """
    grids = np.meshgrid(*[np.arange(1, d + 1) for d in dims], indexing="ij")
    ranks = np.stack([g.reshape(-1) for g in grids], 1)  # every candidate, (M, modes)
    core = ranks.prod(1)
    params = core + ranks @ np.asarray(dims)
    valid = (params <= budget + 1e-9) & np.all(ranks <= core[:, None] // ranks, axis=1)
    if not valid.any():
        minimum = 1 + sum(dims)
        raise ValueError(
            f"the budget of {budget:.1f} parameters per image is too small for a Tucker decomposition of "
            f"{'x'.join(map(str, dims))} images: ranks 1 need {minimum} (ratio >= {minimum / math.prod(dims):.4f})"
        )
    candidates = np.flatnonzero(valid)
    best = candidates[np.lexsort((params[candidates], -core[candidates]))[0]]
    return tuple(int(r) for r in ranks[best])


def _area_matrix(small: int, size: int, device: torch.device) -> torch.Tensor:
    """``(small, size)`` float64 weights: overlap of small pixel ``i`` (``[i, i + 1) * size / small``) with
    pixel ``j``, over the small pixel's width, so every row sums to 1."""
    edges = torch.arange(small + 1, dtype=torch.float64) * (size / small)
    pixels = torch.arange(size + 1, dtype=torch.float64)
    lo = torch.maximum(edges[:-1, None], pixels[None, :-1])
    hi = torch.minimum(edges[1:, None], pixels[None, 1:])
    return ((hi - lo).clamp_min(0) / (size / small)).to(device)


def _small_size(h: int, w: int, ratio: float) -> tuple[int, int]:
    """Largest ``(hs, ws)`` with ``hs * ws <= ratio * h * w``, near the aspect ratio."""
    budget = math.floor(ratio * h * w + 1e-9)
    if budget < 1:
        raise ValueError(f"ratio {ratio} keeps no pixel of a {h}x{w} image: it needs ratio >= {1 / (h * w):.3g}")
    scale = math.sqrt(budget / (h * w))
    best = (1, 1)
    # A side near the aspect ratio (at most the budget: the other side is at least 1), the other side as large as
    # the budget lets it; from the height, then from the width, which a narrow image needs (16x1 at 0.5: 8x1).
    for hs in {max(1, min(h, budget, math.floor(h * scale))), max(1, min(h, budget, math.ceil(h * scale)))}:
        ws = min(w, budget // hs)
        if hs * ws > best[0] * best[1]:
            best = (hs, ws)
    for ws in {max(1, min(w, budget, math.floor(w * scale))), max(1, min(w, budget, math.ceil(w * scale)))}:
        hs = min(h, budget // ws)
        if hs * ws > best[0] * best[1]:
            best = (hs, ws)
    return best


def _codec(x, fmt: str, feature: str, quality, bytes_ratio, options: dict) -> BaselineResult:
    from PIL import Image, features

    if not features.check(feature):
        raise ImportError(
            f"this Pillow ({Image.__version__}) cannot write {fmt}; install a build with {fmt} support, e.g. the "
            "PyPI wheels: pip install -U pillow"
        )
    imgs = _images(x)
    if (quality is None) == (bytes_ratio is None):
        raise ValueError(
            f"give exactly one budget, quality or bytes_ratio; got quality={quality!r}, bytes_ratio={bytes_ratio!r}"
        )
    if quality is not None:
        quality = _check_int("quality", quality, 0)
        if quality > 100:
            raise ValueError(f"quality must be in 0..100, got {quality}")
    else:
        bytes_ratio = _check_number("bytes_ratio", bytes_ratio)
        if not 0 < bytes_ratio < math.inf:
            raise ValueError(f"bytes_ratio must be positive and finite, got {bytes_ratio}")
    n, c, h, w = imgs.shape
    if c not in (1, 3):
        raise ValueError(f"{fmt} encodes gray (C = 1) or RGB (C = 3) images, got {c} channels (shape {tuple(x.shape)})")
    if x.is_floating_point():
        lo, hi = float(x.min()) if x.numel() else 0.0, float(x.max()) if x.numel() else 0.0
        if lo < 0 or hi > 1:
            raise ValueError(
                f"float images must lie in [0, 1] for {fmt} (torchvision's convention), got values in "
                f"[{lo:.4g}, {hi:.4g}]; scale them, or pass uint8"
            )
        pixels = (imgs.detach().cpu().to(torch.float64) * 255).round().to(torch.uint8)
    else:
        pixels = imgs.detach().cpu()
    mode = "L" if c == 1 else "RGB"
    arrays = pixels.permute(0, 2, 3, 1).numpy()
    raw = c * h * w

    def encode(array: np.ndarray, q: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if c == 1 else array).save(buffer, format=fmt, quality=q, **options)
        return buffer.getvalue()

    out = np.empty(arrays.shape, np.uint8)
    sizes = torch.empty(n, dtype=torch.int64)
    qualities = torch.empty(n, dtype=torch.int64)
    budget = None if bytes_ratio is None else math.floor(bytes_ratio * raw + 1e-9)
    for i, array in enumerate(arrays):
        if budget is None:
            q, data = int(quality), encode(array, int(quality))
        else:
            q, fitted = _fit_quality(lambda q, a=array: encode(a, q), budget)
            if fitted is None:
                raise ValueError(
                    f"{fmt} cannot fit image {i} ({c}x{h}x{w}) into {budget} bytes (bytes_ratio={bytes_ratio} of "
                    f"{raw} raw bytes): even quality 0 takes {q} bytes; raise bytes_ratio or choose a codec with "
                    "smaller headers"
                )
            data = fitted
        with Image.open(io.BytesIO(data)) as decoded:
            out[i] = np.asarray(decoded.convert(mode)).reshape(h, w, c)
        sizes[i], qualities[i] = len(data), q
    rec = torch.from_numpy(out).permute(0, 3, 1, 2).to(torch.float64)
    if x.is_floating_point():
        rec = rec / 255
    budget = f"quality {quality}" if quality is not None else f"bytes_ratio {bytes_ratio}"
    return BaselineResult(_like(rec, x), None, sizes, f"{fmt.lower()} {budget}", {"quality": qualities})


def _fit_quality(encode, budget: int) -> tuple[int, bytes | None]:
    """Highest quality in ``0..100`` whose file fits ``budget`` bytes (binary search; sizes grow with quality).

    Returns ``(quality, file)``, or ``(size at quality 0, None)`` when nothing fits. Every returned file was
    measured, so the budget holds even where a codec's size is not monotonic in the quality.
    """
    smallest = encode(0)
    if len(smallest) > budget:
        return len(smallest), None
    best, best_data = 0, smallest
    lo, hi = 1, 100
    while lo <= hi:
        mid = (lo + hi) // 2
        data = encode(mid)
        if len(data) <= budget:
            best, best_data, lo = mid, data, mid + 1
        else:
            hi = mid - 1
    return best, best_data
