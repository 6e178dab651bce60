"""Public engine: :func:`decompose`, the :class:`MPS` it returns, and :func:`entanglement_entropy`.

Method: TT-SVD (Oseledets 2011, "Tensor-train decomposition") of every image after a site layout, with
bonds truncated to a budget, optionally followed by residual MPS terms (paper Alg. 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from . import _budget, _engine
from ._layout import Layout, make_layout
from ._typing import ChannelMode, SiteDims

__all__ = ["MPS", "decompose", "entanglement_entropy", "CORE_DTYPES"]

#: Storage schemes of the cores (:mod:`mpsdata._quant`): floats, or integers with per-core scales.
CORE_DTYPES = ("float32", "float16", "int8", "int4")


class MPS:
    """Matrix product states of a batch of images, as returned by :func:`decompose`.

    Every image (or every channel, with ``channel_mode="separate"``) is a sum of ``terms`` MPS with the
    same site and bond dimensions. The cores are stored packed; :attr:`cores` gives shaped views.

    Attributes:
        layout: How pixels map to sites (see :attr:`site_dims`).
        bond_dims: Stored bond dimensions ``d_1 ... d_{n-1}``, the same for every image and term.
        batch_shape: Leading dims of the input that index images.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        layout: Layout,
        bond_dims: Sequence[int],
        ranks: torch.Tensor,
        eps2: torch.Tensor,
        tails: torch.Tensor | None,
        batch_shape: Sequence[int],
    ) -> None:
        self._packed = packed  # (B, terms, P)
        self.layout = layout
        self.bond_dims = tuple(int(d) for d in bond_dims)
        self._ranks = ranks  # (B, terms, n - 1)
        self._eps2 = eps2  # discarded by the sweep: sums to the squared error of the term
        self._tails = tails  # discarded from the original unfoldings: paper Definition 1
        self.batch_shape = tuple(batch_shape)
        self._error: torch.Tensor | None = None  # measured error, when the sweep's weight is not it (padding)
        self._core_dtype: str | None = None  # storage scheme the cores were rounded to (decompose's core_dtype)
        self._quantized = None  # _quant.QuantizedCores of integer schemes: what a core file stores

    # -- shape ----------------------------------------------------------------------------------------
    @property
    def site_dims(self) -> tuple[int, ...]:
        """Site dimensions ``j_1 ... j_n``."""
        return self.layout.site_dims

    @property
    def terms(self) -> int:
        """Number of MPS terms per image: 1 + the residual terms."""
        return self._packed.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._packed.dtype

    @property
    def device(self) -> torch.device:
        return self._packed.device

    @property
    def cores(self) -> tuple[torch.Tensor, ...]:
        """Core ``k`` as a view of shape ``(*batch_shape, terms, d_{k-1}, j_k, d_k)``."""
        packed = self._packed.reshape(*self.batch_shape, self.terms, self._packed.shape[-1])
        return tuple(_engine.unpack(packed, self.site_dims, self.bond_dims))

    # -- per-image figures ------------------------------------------------------------------------------
    @property
    def ranks(self) -> torch.Tensor:
        """Bond dimensions each image actually uses, ``(*batch_shape, terms, n - 1)``.

        Equal to :attr:`bond_dims` except where a tolerance stopped an image earlier.
        """
        return self._ranks.reshape(*self.batch_shape, self.terms, len(self.bond_dims))

    @property
    def ratio(self) -> torch.Tensor:
        """The paper's compression ratio per image, all terms counted, ``(*batch_shape,)`` float64.

        Parameters kept over values of the original image: ``sum_k d_{k-1} j_k d_k / (H W [C])``.
        """
        ranks = self._ranks.to(torch.float64)
        ones = torch.ones_like(ranks[..., :1])
        bonds = torch.cat([ones, ranks, ones], -1)
        sites = torch.tensor(self.site_dims, dtype=torch.float64, device=ranks.device)
        params = (bonds[..., :-1] * sites * bonds[..., 1:]).sum((-1, -2))
        return (params / self.layout.num_values).reshape(self.batch_shape)

    @property
    def truncation_errors(self) -> torch.Tensor:
        """Local truncation error ``eps_k`` of every bond and term, ``(*batch_shape, terms, n - 1)``.

        Paper Definition 1 with Oseledets' norm: the root of the sum of the squared singular values that
        a rank-``d_k`` truncation discards from the ``k``-th unfolding of the image the term decomposes
        (the image itself for the first term, the residual left by the previous terms after it).
        """
        return self._need_tails().clamp_min(0).sqrt().reshape(*self.batch_shape, self.terms, len(self.bond_dims))

    @property
    def error_bound(self) -> torch.Tensor:
        """Theorem 1 bound on ``||image - reconstruction||_F`` per image, ``(*batch_shape,)``.

        ``sqrt(sum_k eps_k^2)`` of the last term: each residual term decomposes the error left by the
        terms before it, so the last term's truncation bounds the error of the sum.
        """
        return self._need_tails()[:, -1].clamp_min(0).sum(-1).sqrt().reshape(self.batch_shape)

    def _need_tails(self) -> torch.Tensor:
        if self._tails is None:
            raise ValueError(
                "this MPS was made with compute_bound=False: truncation_errors and error_bound were not "
                "computed; call decompose(..., compute_bound=True) (exact errors are in .error)"
            )
        return self._tails

    @property
    def error(self) -> torch.Tensor:
        """Exact ``||image - reconstruction||_F`` per image, ``(*batch_shape,)``, without the image.

        The left-to-right sweep discards mutually orthogonal pieces, so the squared error is the sum of
        what it discarded at each bond of the last term (accurate to about ``sqrt(eps) * ||image||``, as it
        comes from Gram eigenvalues). With a padded layout it is measured on the real pixels instead.
        """
        if self._error is not None:
            return self._error.reshape(self.batch_shape)
        return self._eps2[:, -1].clamp_min(0).sum(-1).sqrt().reshape(self.batch_shape)

    @property
    def core_dtype(self) -> str:
        """Storage scheme of the cores: decompose's ``core_dtype``, else the math dtype (``"float32"``...)."""
        return self._core_dtype or str(self._packed.dtype).removeprefix("torch.")

    @property
    def nbytes(self) -> torch.Tensor:
        """Bytes a core file stores for the cores of every MPS, ``(*batch_shape,)`` int64.

        Values at :attr:`core_dtype` plus, for ``"int8"``/``"int4"``, the per-core scales (float16 for every
        core but the last, float32 for the last, which carries the norm); all terms counted. This is before
        any generic (HDF5 filter) compression, and without the file's per-image bookkeeping (ranks, targets).

        Example:
            >>> import torch, mpsdata
            >>> m = mpsdata.decompose(torch.rand(2, 8, 8) * 255, bytes_ratio=0.7, site_dims=[8, 8])
            >>> m.core_dtype, m.bond_dims, m.nbytes.tolist()  # 2 x 16 int8 values + 2 + 4 scale bytes
            ('int8', (2,), [38, 38])
        """
        from . import _quant

        if self._core_dtype is None:
            per_image = self._packed.shape[1] * self._packed.shape[2] * self._packed.element_size()
        else:
            per_image = _quant.nbytes_per_image(self.site_dims, self.bond_dims, self.terms, self._core_dtype)
        return torch.full(self.batch_shape, per_image, dtype=torch.int64)

    # -- operations -----------------------------------------------------------------------------------
    def reconstruct(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Contract every MPS and sum its terms.

        Args:
            dtype: ``None`` for the MPS's float dtype, or ``torch.uint8`` to round and clamp to ``0..255``
                in the same pass (the fast path for uint8 images).

        Returns:
            A tensor of the input's shape, on the input's scale (uint8 input gives 0..255 values).
        """
        if dtype not in (None, torch.uint8):
            raise TypeError(f"dtype must be None or torch.uint8, got {dtype}; use .to() for other float dtypes")
        flat = _engine.decode(
            self._packed, self.layout.scatter_index, self.site_dims, self.bond_dims, quantize=dtype == torch.uint8
        )
        image = (self.layout.channels, self.layout.height, self.layout.width)
        return flat.reshape(*self.batch_shape, *image[3 - self.layout.image_dims :])

    def entanglement_entropy(self) -> torch.Tensor:
        """Entanglement entropy of every bond of the stored (truncated) state, ``(*batch_shape, n - 1)``.

        Never above ``ln(terms * d_k)`` for bond ``k``.
        """
        return _entropy(self.layout.to_sites(self.reconstruct()), self.site_dims)

    def to(self, device: torch.device | str) -> MPS:
        """Copy to another device."""
        moved = MPS(
            self._packed.to(device), self.layout, self.bond_dims, self._ranks, self._eps2, self._tails, self.batch_shape
        )
        moved._error = self._error
        moved._core_dtype = self._core_dtype
        moved._quantized = self._quantized
        return moved

    def __getitem__(self, index) -> MPS:
        """Select images along the leading batch dims, like indexing the input tensor."""
        if not self.batch_shape:
            raise IndexError("this MPS holds a single image; there is no batch dim to index")
        positions = torch.arange(self._packed.shape[0]).reshape(self.batch_shape)[index]
        flat = positions.reshape(-1)
        picked = MPS(
            self._packed[flat.to(self._packed.device)],
            self.layout,
            self.bond_dims,
            self._ranks[flat],
            self._eps2[flat],
            None if self._tails is None else self._tails[flat],
            positions.shape,
        )
        picked._error = None if self._error is None else self._error[flat]
        picked._core_dtype = self._core_dtype
        if self._quantized is not None:
            from dataclasses import replace

            q = self._quantized
            rows = flat.to(q.values.device)
            picked._quantized = replace(q, values=q.values[rows], scales=None if q.scales is None else q.scales[rows])
        return picked

    def __repr__(self) -> str:
        ratio = self.ratio
        shown = f"{ratio.max().item():.4f}" if ratio.numel() else "n/a"
        stored = "" if self._core_dtype is None else f", core_dtype={self._core_dtype!r}"
        return (
            f"MPS(batch_shape={self.batch_shape}, layout={self.layout.describe()}, bond_dims={self.bond_dims}, "
            f"terms={self.terms}, ratio={shown}{stored}, dtype={self.dtype}, device={self.device})"
        )


def decompose(
    x: torch.Tensor | np.ndarray,
    ratio: float | None = None,
    *,
    bytes_ratio: float | None = None,
    bond_dims: Sequence[int] | None = None,
    max_bond: int | None = None,
    tol: float | None = None,
    residual: int = 0,
    site_dims: SiteDims = None,
    channel_mode: ChannelMode = "separate",
    core_dtype: str | None = None,
    dtype: torch.dtype | None = None,
    compute_bound: bool = True,
) -> MPS:
    """Factorise images into matrix product states, truncated to a budget.

    Every image is laid out on sites (``site_dims``), decomposed by TT-SVD (Oseledets 2011) with its bonds
    truncated, and, with ``residual=k``, refined by ``k`` residual MPS terms that decompose what the
    previous terms missed (paper Alg. 2). One call handles a whole batch; on CPU tensors it runs compiled
    kernels, on other devices batched ``torch.linalg``.

    Args:
        x: Images ``(..., H, W)``, or ``(..., C, H, W)`` with ``channel_mode="site"``; uint8 or float, any
            leading batch dims. With ``channel_mode="separate"`` a channel dim is simply a batch dim.
        ratio: The paper's compression ratio ``rho`` in ``(0, 1]``: parameters kept over values of the
            image, all terms counted. Solved into bond dimensions that never exceed it.
        bytes_ratio: A byte budget instead: stored bytes (:attr:`MPS.nbytes`, cores at ``core_dtype``, default
            ``"int8"``) over the raw uint8 bytes of the image, all terms counted; solved into the largest
            bonds that never exceed it (see docs/bytes.md for what each budget reaches).
        bond_dims: Explicit bond dimensions ``d_1 ... d_{n-1}`` (clipped to what the sites can carry).
        max_bond: Cap every bond at this value.
        tol: Relative tolerance: each image keeps the smallest bonds whose truncation errors satisfy
            ``eps_k <= tol / sqrt(n - 1) * ||image||``, so the total error is at most ``tol * ||image||``.
            Combines with ``bond_dims`` or ``max_bond`` as caps.
        residual: Number of residual MPS terms added after the first.
        site_dims: Site layout: ``None`` (the measured default for the image size), ``"row"``,
            ``"hierarchical"``, explicit row-major sizes (``[2, 4, 7, 7, 2]``), or hierarchical
            ``(row, col)`` digit pairs (``[(7, 7), (2, 2), (2, 2)]``). ``[H, W]`` is the plain matrix SVD.
            ``"auto"`` searches on the first 64 images for the layout with the best PSNR at the budget
            (``ratio`` or ``bytes_ratio``; candidates: both families, ``[H, W]``, balanced 3- and 4-site
            chains; :func:`mpsdata._quant.search_layout`) and uses it for all; :attr:`MPS.layout` tells which.
        channel_mode: ``"separate"`` (each channel its own MPS) or ``"site"`` (channels as the last site).
        core_dtype: Storage scheme of the cores, one of :data:`CORE_DTYPES`: the cores are rounded to it (so
            :meth:`MPS.reconstruct` shows what a core file holds) and :attr:`MPS.nbytes` counts it. The integer
            schemes store each core in the left-canonical gauge with one scale per core (int4 with the
            quantisation-aware refit of :func:`mpsdata._quant.quantize_refit`). Default: ``"int8"`` with
            ``bytes_ratio``, else none (cores at the math dtype, as computed).
        dtype: ``torch.float32`` or ``torch.float64`` math; default float64 for float64 input, else float32.
        compute_bound: Also compute the paper's truncation errors (Definition 1) and the Theorem 1 bound,
            an extra eigenvalue problem per truncated bond (+60% time on 28x28); the exact error
            (:attr:`MPS.error`) is always computed. With a ``core_dtype``, the bound is that of the cores
            before rounding, and :attr:`MPS.error` is measured after it.

    Returns:
        The :class:`MPS` of every image.

    Raises:
        TypeError: ``x`` is not a tensor or array of uint8 or float values, or an argument has the wrong type.
        ValueError: wrong number of dims, NaN or infinite pixels, an invalid or missing budget, or site
            dims that do not match the image.

    Example:
        >>> import torch, mpsdata
        >>> x = torch.arange(64.0).reshape(8, 8)
        >>> m = mpsdata.decompose(x, bond_dims=[2, 2], site_dims=[4, 4, 4])
        >>> m.bond_dims, round(m.ratio.item(), 3)
        ((2, 2), 0.5)
        >>> torch.allclose(m.reconstruct(), x, atol=1e-3)  # the ramp has rank 2
        True
        >>> small = mpsdata.decompose(x, bytes_ratio=0.7, site_dims=[8, 8])  # int8 cores, at most 44 bytes
        >>> small.nbytes.item(), small.core_dtype, small.bond_dims
        (38, 'int8', (2,))
        >>> bool((small.reconstruct() - x).abs().max() < 0.5)
        True
    """
    x = _as_tensor(x)
    if channel_mode not in ("separate", "site"):
        raise ValueError(f"channel_mode must be 'separate' or 'site', got {channel_mode!r}")
    image_dims = 3 if channel_mode == "site" else 2
    if x.ndim < image_dims:
        expected = "(..., C, H, W)" if channel_mode == "site" else "(..., H, W)"
        raise ValueError(f"x must have shape {expected} with channel_mode={channel_mode!r}, got {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"x (shape {tuple(x.shape)}) contains NaN or infinite values; clean or clamp them first")
    compute = _compute_dtype(x, dtype)
    terms = check_budget(ratio, bond_dims, max_bond, tol, residual, bytes_ratio)
    core_dtype = check_core_dtype(core_dtype, bytes_ratio)

    channels = x.shape[-3] if channel_mode == "site" else 1
    height, width = x.shape[-2], x.shape[-1]
    if isinstance(site_dims, str) and site_dims == "auto":
        site_dims = _auto_sites(x, image_dims, ratio, bytes_ratio, core_dtype, terms)
    layout = make_layout(height, width, channels, site_dims, channel_mode)
    bonds, use_tol = _solve_bonds(layout, ratio, bond_dims, max_bond, tol, terms, bytes_ratio, core_dtype)

    batch_shape = x.shape[: x.ndim - image_dims]
    flat = x.reshape(-1, layout.num_values)
    packed = _engine.encode(
        flat, layout.gather_index, layout.site_dims, bonds, tol=use_tol, terms=terms, dtype=compute,
        tails=bool(compute_bound),
    )  # fmt: skip
    cores = packed.cores
    if use_tol > 0 and flat.shape[0]:
        cores, bonds = _compact(cores, packed.ranks, layout.site_dims, bonds)
    tails = None if packed.tails is None else packed.tails.cpu()
    quantized = None
    if core_dtype is not None:
        cores, quantized = _round_cores(cores, flat, layout, bonds, core_dtype)
    result = MPS(cores, layout, bonds, packed.ranks.cpu(), packed.eps2.cpu(), tails, batch_shape)
    result._core_dtype, result._quantized = core_dtype, quantized
    rounded = core_dtype is not None and core_dtype != str(compute).removeprefix("torch.")
    if (rounded or layout.padded_height * layout.padded_width != height * width) and flat.shape[0]:
        # The sweep's discarded weight counts the replicated edge pixels too: measure on the real pixels.
        result._error = (result.reconstruct().reshape(flat.shape) - flat.to(compute)).norm(dim=-1).cpu()
    return result


def entanglement_entropy(
    x: torch.Tensor | np.ndarray,
    site_dims: SiteDims = None,
    *,
    channel_mode: ChannelMode = "separate",
) -> torch.Tensor:
    """Entanglement entropy of every bond of images (paper Eq. 3), without truncation.

    ``E_k = -sum_j v_j ln v_j`` over the Schmidt weights ``v_j = lambda_j^2 / sum lambda^2`` of the
    unfolding that cuts the sites between ``k`` and ``k + 1``. A zero image has entropy 0.

    Args:
        x: Images ``(..., H, W)`` (or ``(..., C, H, W)`` with ``channel_mode="site"``).
        site_dims: Site layout, as in :func:`decompose`.
        channel_mode: As in :func:`decompose`.

    Returns:
        Float64 tensor ``(..., n - 1)``.

    Example:
        >>> import torch, mpsdata
        >>> flat = torch.ones(4, 4)
        >>> entropy = mpsdata.entanglement_entropy(flat, site_dims=[2, 2, 2, 2])  # a product state
        >>> entropy.shape, bool(entropy.abs().max() < 1e-12)
        (torch.Size([3]), True)
        >>> checker = (torch.arange(4)[:, None] + torch.arange(4)) % 2 * 1.0
        >>> mpsdata.entanglement_entropy(checker, site_dims=[4, 4]).item()  # 2 equal Schmidt values
        0.6931...
    """
    x = _as_tensor(x)
    image_dims = 3 if channel_mode == "site" else 2
    if x.ndim < image_dims:
        raise ValueError(f"x must have at least {image_dims} dims, got shape {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"x (shape {tuple(x.shape)}) contains NaN or infinite values")
    channels = x.shape[-3] if channel_mode == "site" else 1
    layout = make_layout(x.shape[-2], x.shape[-1], channels, site_dims, channel_mode)
    sites = layout.to_sites(x.to(torch.float64))
    return _entropy(sites, layout.site_dims)


# ---------------------------------------------------------------------------------------------------
def _entropy(sites: torch.Tensor, site_dims: Sequence[int]) -> torch.Tensor:
    batch = sites.shape[:-1]
    flat = sites.reshape(-1, sites.shape[-1]).to(torch.float64)
    total = flat.shape[-1]
    entropies = []
    left = 1
    for j in site_dims[:-1]:
        left *= j
        mat = flat.reshape(-1, left, total // left)
        gram = mat @ mat.mT if left <= total // left else mat.mT @ mat
        weights = torch.linalg.eigvalsh(gram).clamp_min(0)
        norm = weights.sum(-1, keepdim=True)
        v = torch.where(norm > 0, weights / norm.clamp_min(torch.finfo(torch.float64).tiny), 0)
        entropies.append(-(torch.where(v > 0, v * v.log(), 0)).sum(-1))
    return torch.stack(entropies, -1).reshape(*batch, len(site_dims) - 1)


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x must be a torch.Tensor or numpy array of images, got {type(x).__name__}; "
            "for PIL images use mpsdata.MPSCompress or torchvision.transforms.functional.pil_to_tensor"
        )
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
    return x


def _compute_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float64 if x.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_budget(ratio, bond_dims, max_bond, tol, residual, bytes_ratio=None) -> int:
    """Validate the budget arguments that do not depend on the image; returns the number of terms."""
    terms = _check_int("residual", residual, minimum=0) + 1
    if ratio is not None and bytes_ratio is not None:
        raise ValueError("give either ratio or bytes_ratio, not both: each decides the bonds itself")
    if bytes_ratio is not None:
        if bond_dims is not None or max_bond is not None or tol is not None:
            raise ValueError(
                "give either bytes_ratio or bond_dims/max_bond/tol, not both: bytes_ratio decides the bonds itself"
            )
        value = _check_number("bytes_ratio", bytes_ratio)
        if math.isnan(value) or not 0 < value < math.inf:
            raise ValueError(f"bytes_ratio must be positive and finite, got {bytes_ratio}")
    elif ratio is not None:
        if bond_dims is not None or max_bond is not None or tol is not None:
            raise ValueError("give either ratio or bond_dims/max_bond/tol, not both: ratio decides the bonds itself")
        value = _check_number("ratio", ratio)
        if math.isnan(value) or not 0 < value <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    elif bond_dims is None and max_bond is None and tol is None:
        raise ValueError("give a budget: ratio, bytes_ratio, bond_dims, max_bond or tol")
    if bond_dims is not None:
        if isinstance(bond_dims, (str, bytes)) or not isinstance(bond_dims, Sequence):
            raise TypeError(f"bond_dims must be a sequence of ints, got {type(bond_dims).__name__}")
        for d in bond_dims:
            _check_int("every bond dimension", d, minimum=1)
    if max_bond is not None:
        _check_int("max_bond", max_bond, minimum=1)
    if tol is not None and not _check_number("tol", tol) >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return terms


def check_core_dtype(core_dtype, bytes_ratio=None) -> str | None:
    """Validate a storage scheme; ``None`` becomes ``"int8"`` under a byte budget."""
    if core_dtype is None:
        return "int8" if bytes_ratio is not None else None
    if not isinstance(core_dtype, str):
        raise TypeError(f"core_dtype must be a string, one of {CORE_DTYPES}, got {type(core_dtype).__name__}")
    if core_dtype not in CORE_DTYPES:
        raise ValueError(f"core_dtype must be one of {CORE_DTYPES}, got {core_dtype!r}")
    return core_dtype


def _solve_bonds(
    layout: Layout,
    ratio: float | None,
    bond_dims: Sequence[int] | None,
    max_bond: int | None,
    tol: float | None,
    terms: int,
    bytes_ratio: float | None = None,
    core_dtype: str | None = None,
) -> tuple[tuple[int, ...], float]:
    """Bond caps and the tolerance (0 for none) from validated budget arguments."""
    sites = layout.site_dims
    if bytes_ratio is not None:
        from . import _quant

        try:
            bonds = _quant.bonds_for_bytes(sites, float(bytes_ratio), layout.num_values, terms, core_dtype or "int8")
        except ValueError as error:
            raise ValueError(f"{error} (image {layout.describe()})") from None
        return bonds, 0.0
    if ratio is not None:
        return _budget.bonds_for_ratio(sites, float(ratio), layout.num_values, terms), 0.0
    caps = list(_budget.max_bonds(sites))
    if bond_dims is not None:
        if len(bond_dims) != len(caps):
            raise ValueError(
                f"bond_dims must have one entry per bond: {len(caps)} for site dims {list(sites)}, "
                f"got {len(bond_dims)} ({list(bond_dims)})"
            )
        caps = [min(c, int(d)) for c, d in zip(caps, bond_dims, strict=False)]
    if max_bond is not None:
        caps = [min(c, int(max_bond)) for c in caps]
    return _budget.tighten(caps, sites), float(tol or 0.0)


AUTO_SAMPLE = 64  # images site_dims="auto" searches on


def _auto_sites(x: torch.Tensor, image_dims: int, ratio, bytes_ratio, core_dtype, terms: int):
    """The site spec with the best mean PSNR at the budget on the first images (``site_dims="auto"``)."""
    from . import _quant

    if ratio is None and bytes_ratio is None:
        raise ValueError("site_dims='auto' searches layouts at a ratio or bytes_ratio budget; give one of them")
    sample = x.reshape(-1, *x.shape[x.ndim - image_dims :])[:AUTO_SAMPLE].to(torch.float64).cpu()
    if sample.shape[0] == 0:
        return None
    if image_dims == 3 and sample.shape[1] not in (1, 3):
        raise ValueError(f"site_dims='auto' with channel_mode='site' takes 1 or 3 channels, got {sample.shape[1]}")
    if x.dtype != torch.uint8:  # the search scores uint8 images: map the sample's range onto 0..255
        low, high = sample.min(), sample.max()
        sample = (sample - low) * (255 / (high - low)) if high > low else torch.zeros_like(sample)
    if bytes_ratio is not None:
        scheme, budget = core_dtype or "int8", float(bytes_ratio)
    else:  # float32 bytes are 4 per parameter: this budget gives exactly the bonds of the ratio
        scheme, budget = "float32", 4 * float(ratio)
    colours = ("rgb-site",) if image_dims == 3 else None
    try:
        found = _quant.search_layout(sample, budget / terms, scheme, colours=colours, domains=("pixels",))
    except ValueError as error:
        raise ValueError(f"site_dims='auto': {error}") from None
    return found["best"]["site_dims"]


def _round_cores(cores: torch.Tensor, flat: torch.Tensor, layout: Layout, bonds, core_dtype: str):
    """Cores rounded to a storage scheme (same dtype as ``cores``) and, for integer schemes, the stored form."""
    from . import _quant

    if core_dtype in ("float32", "float16"):
        dtype = torch.float32 if core_dtype == "float32" else torch.float16
        return cores.to(dtype).to(cores.dtype), None
    if cores.shape[0] == 0:
        q = _quant.quantize(cores, layout.site_dims, bonds, core_dtype)
    elif core_dtype == "int4":  # the coarse grid gains from fitting each core to the rounded ones before it
        sites = flat.index_select(-1, torch.from_numpy(layout.gather_index).to(flat.device))
        q = _quant.quantize_refit(sites, layout.site_dims, bonds, cores.shape[1], core_dtype)
    else:  # int8: rounding in the left-canonical gauge loses < 0.05 dB (docs/bytes.md)
        q = _quant.quantize(cores, layout.site_dims, bonds, core_dtype)
    return q.dequantize().to(device=cores.device, dtype=cores.dtype), q


def _compact(cores: torch.Tensor, ranks: torch.Tensor, site_dims, bonds) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Drop bond slots no image uses (a tolerance chose smaller ranks); they hold only zeros."""
    used = tuple(int(r) for r in ranks.reshape(-1, len(bonds)).amax(0).clamp_min(1))
    if used == tuple(bonds):
        return cores, tuple(bonds)
    full = [1, *used, 1]
    parts = _engine.unpack(cores, site_dims, bonds)
    trimmed = [p[..., : full[k], :, : full[k + 1]] for k, p in enumerate(parts)]
    return torch.cat([t.flatten(-3) for t in trimmed], -1).contiguous(), used
