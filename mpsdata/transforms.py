"""``MPSCompress``: MPS compression as a torchvision transform."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2._utils import is_pure_tensor

from ._mps import check_budget, check_core_dtype, check_transform, decompose
from ._typing import ChannelMode, SiteDims

__all__ = ["MPSCompress"]

# PIL modes whose bands are 8-bit intensities; palette ("P") or bilevel ("1") values are not.
_PIL_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")
# One band of wider numbers: 32-bit floats, 32-bit and 16-bit integers (rounded and clamped back to their type).
_PIL_WIDE_MODES = ("F", "I", "I;16")


class MPSCompress(Transform):
    """Replace an image by its MPS approximation at a budget (decompose, then reconstruct).

    Works in torchvision v1 (``transforms.Compose``) and v2 pipelines. Accepts a PIL image (returns a PIL
    image of the same mode and size; 8-bit modes, where a constant alpha band is kept as it is, and the
    one-band ``F``, ``I`` and ``I;16`` whose integers are rounded and clamped back to their type; convert
    palette and bilevel images first), a tensor
    ``[..., C, H, W]`` (returns the same shape, dtype and device: uint8 stays uint8 in ``0..255``; float
    images in ``[0, 1]`` stay in ``[0, 1]``), or a ``tv_tensors.Image``/``Video`` (returns the same type).
    In a v2 sample, bounding boxes, masks and labels pass through untouched. The input is never modified.

    Args:
        ratio: The paper's compression ratio ``rho`` in ``(0, 1]``.
        bytes_ratio: A byte budget instead: stored core bytes over raw uint8 bytes (see :func:`mpsdata.decompose`).
        bond_dims: Explicit bond dimensions instead of a ratio.
        max_bond: Cap on every bond instead of a ratio.
        tol: Relative error tolerance instead of a ratio.
        residual: Residual MPS terms after the first (paper Alg. 2), counted in ``ratio``.
        site_dims: Site layout (see :func:`mpsdata.decompose`).
        channel_mode: ``"site"`` (default: the channels are the last site of one MPS per image; 3 to 6 dB
            better than ``"separate"`` on colour photos at the same ratio, docs/layouts.md) or ``"separate"``
            (one MPS per channel). Gray images are the same either way.
        core_dtype: Storage scheme the cores are rounded to (``"float32"``, ``"float16"``, ``"int8"``,
            ``"int4"``; default ``"int8"`` with ``bytes_ratio``, else none), so the output shows what a core
            file would hold.
        dtype: Math dtype, ``torch.float32`` or ``torch.float64``.
        domain: ``"pixels"`` or ``"dct"`` (see :func:`mpsdata.decompose`).
        colour: ``"rgb"`` or ``"ycc"`` (luma/chroma, 3-channel images; see :func:`mpsdata.decompose`).
        luma_share: Luma's share of the budget with ``colour="ycc"`` and ``channel_mode="separate"``.

    Example:
        >>> import torch
        >>> from mpsdata import MPSCompress
        >>> t = MPSCompress(ratio=0.5)
        >>> img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
        >>> out = t(img)
        >>> out.shape, out.dtype
        (torch.Size([3, 32, 32]), torch.uint8)
    """

    _transformed_types = (is_pure_tensor, tv_tensors.Image, tv_tensors.Video, PIL.Image.Image)

    def __init__(
        self,
        ratio: float | None = None,
        *,
        bytes_ratio: float | None = None,
        bond_dims: Sequence[int] | None = None,
        max_bond: int | None = None,
        tol: float | None = None,
        residual: int = 0,
        site_dims: SiteDims = None,
        channel_mode: ChannelMode = "site",
        core_dtype: str | None = None,
        dtype: torch.dtype | None = None,
        domain: str | None = None,
        colour: str | None = None,
        luma_share: float | None = None,
    ) -> None:
        super().__init__()
        check_budget(ratio, bond_dims, max_bond, tol, residual, bytes_ratio)
        check_core_dtype(core_dtype)
        if channel_mode not in ("separate", "site"):
            raise ValueError(f"channel_mode must be 'separate' or 'site', got {channel_mode!r}")
        if dtype not in (None, torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        check_transform(domain, colour, luma_share, channel_mode, isinstance(site_dims, str) and site_dims == "auto")
        self.ratio = ratio
        self.bytes_ratio = bytes_ratio
        self.bond_dims = None if bond_dims is None else tuple(bond_dims)
        self.max_bond = max_bond
        self.tol = tol
        self.residual = residual
        self.site_dims = site_dims if site_dims is None or isinstance(site_dims, str) else tuple(site_dims)
        self.channel_mode = channel_mode
        self.core_dtype = core_dtype
        self.dtype = dtype
        self.domain = domain
        self.colour = colour
        self.luma_share = luma_share

    def _options(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "bytes_ratio": self.bytes_ratio,
            "bond_dims": self.bond_dims,
            "max_bond": self.max_bond,
            "tol": self.tol,
            "residual": self.residual,
            "site_dims": self.site_dims,
            "channel_mode": self.channel_mode,
            "core_dtype": self.core_dtype,
            "dtype": self.dtype,
            "domain": self.domain,
            "colour": self.colour,
            "luma_share": self.luma_share,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, PIL.Image.Image):
            return self._pil(inpt)
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)):
            return tv_tensors.wrap(self._tensor(inpt.as_subclass(torch.Tensor)), like=inpt)
        return self._tensor(inpt)

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise TypeError(f"MPSCompress takes uint8 or float images, got {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"MPSCompress takes images of shape [..., C, H, W], got shape {tuple(x.shape)}")
        options = self._options()
        if x.ndim == 2 and self.channel_mode == "site":  # an [H, W] image has no channel axis to fold in
            options["channel_mode"] = "separate"
        # The transform keeps only the image: skip the bound's extra eigenvalue problems.
        m = decompose(x, **options, compute_bound=False)
        if x.dtype == torch.uint8:
            return m.reconstruct(torch.uint8)
        out = m.reconstruct()
        if x.numel() and bool(x.min() >= 0) and bool(x.max() <= 1):
            out = out.clamp_(0, 1)  # a [0, 1] image stays a valid [0, 1] image
        return out.to(x.dtype)

    def _pil(self, img: PIL.Image.Image) -> PIL.Image.Image:
        if img.mode in _PIL_WIDE_MODES:
            return self._pil_wide(img)
        if img.mode not in _PIL_MODES:
            raise TypeError(
                f"MPSCompress takes PIL images with 8-bit bands {_PIL_MODES} or one band {_PIL_WIDE_MODES}, got "
                f"mode {img.mode!r}; convert first, e.g. img.convert('RGB')"
            )
        array = np.asarray(img)
        hwc = array[:, :, None] if array.ndim == 2 else array
        # A constant alpha band (an opaque image) holds nothing to compress: compressed with the colour in one
        # MPS it would come back uneven (tests/test_transforms.py::test_constant_alpha_is_kept), so it is kept.
        alpha = img.mode in ("LA", "RGBA") and bool((hwc[:, :, -1] == hwc[0, 0, -1]).all())
        bands = hwc[:, :, :-1] if alpha else hwc
        chw = torch.from_numpy(bands.transpose(2, 0, 1).copy())  # PIL's buffer is read-only
        out = self._tensor(chw).numpy().transpose(1, 2, 0)
        if alpha:
            out = np.concatenate([out, hwc[:, :, -1:]], axis=2)
        return PIL.Image.frombytes(img.mode, img.size, np.ascontiguousarray(out).tobytes())

    def _pil_wide(self, img: PIL.Image.Image) -> PIL.Image.Image:
        array = np.asarray(img)
        # float64 holds every int32 exactly, float32 every uint16; the tensor path decides the math dtype.
        values = torch.from_numpy(array.astype(np.float64 if img.mode == "I" else np.float32))
        out = self._tensor(values[None])[0].numpy()
        if img.mode != "F":
            limits = np.iinfo(array.dtype)
            out = np.clip(np.floor(out + 0.5), limits.min, limits.max)
        return PIL.Image.fromarray(np.ascontiguousarray(out.astype(array.dtype.newbyteorder("="))))

    def extra_repr(self) -> str:
        defaults = {"residual": 0, "channel_mode": "site"}
        shown = [f"{k}={v!r}" for k, v in self._options().items() if v is not None and defaults.get(k) != v]
        return ", ".join(shown)
