"""How an image becomes the sites of an MPS.

A layout maps the pixels of an ``H x W`` image (optionally with its channels) onto an order-``n`` tensor
with site dimensions ``j_1 ... j_n``. Two families:

* **row-major**: the image is flattened row by row and reshaped into ``site_dims`` (the paper's Table 4
  shapes, e.g. ``[2, 4, 7, 7, 2]`` for 28x28);
* **hierarchical** (Latorre 2005, "Image compression and entanglement"): height and width are written in
  mixed radix, coarse to fine, and site ``k`` holds the ``k``-th row digit and the ``k``-th column digit,
  so each site is one level of a quadtree-like refinement (``[(7, 7), (2, 2), (2, 2)]`` for 28x28).

The default (``site_dims=None``) was chosen by measurement on real images (docs/layouts.md): the plain matrix
SVD ``[H, W]`` below 32 pixels a side, a two-level block layout (block position x pixel in the block) above.

Every layout reduces to one gather index (site order <- flat image) and its inverse, so padding (edge
replication for sizes that do not factor well) and a colour site cost nothing extra at run time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._typing import ChannelMode, SiteDims

__all__ = ["Layout", "make_layout"]

_MAX_PRIME = 7  # sizes whose prime factors are all <= 7 factor into useful sites without padding
_DEFAULT_ROW_SITES = 5  # the paper's shapes all have five sites


@dataclass(frozen=True)
class Layout:
    """Placement of an image's values on MPS sites.

    Attributes:
        height: Image height in pixels.
        width: Image width in pixels.
        channels: Channels folded into the MPS as its last site (1 when channels are separate MPS).
        site_dims: Dimension of every site, the channel site included.
        rows: Row digits, coarse to fine, for a hierarchical layout; ``None`` for row-major.
        cols: Column digits, coarse to fine, for a hierarchical layout; ``None`` for row-major.
        padded_height: Height after edge padding (equal to ``height`` when none is needed).
        padded_width: Width after edge padding.
        channel_site: Whether images carry a channel axis folded into the MPS (``channel_mode="site"``).
    """

    height: int
    width: int
    channels: int
    site_dims: tuple[int, ...]
    rows: tuple[int, ...] | None
    cols: tuple[int, ...] | None
    padded_height: int
    padded_width: int
    channel_site: bool = False

    @property
    def kind(self) -> str:
        """``"row"`` or ``"hierarchical"``."""
        return "row" if self.rows is None else "hierarchical"

    @property
    def num_values(self) -> int:
        """Values of one image (``channels * height * width``), the denominator of the ratio."""
        return self.channels * self.height * self.width

    @property
    def num_sites(self) -> int:
        return len(self.site_dims)

    @property
    def image_dims(self) -> int:
        """Trailing dims of the input that belong to one MPS: 2 (``H, W``) or 3 (``C, H, W``)."""
        return 3 if self.channel_site else 2

    @property
    def spatial_sites(self) -> list:
        """The pixel sites, the channel site left out: the ``site_dims`` that rebuild this layout.

        Example:
            >>> make_layout(28, 28, 3, [4, 7, 28], "site").spatial_sites
            [4, 7, 28]
        """
        if self.rows is None:
            return list(self.site_dims[:-1] if self.channels > 1 else self.site_dims)
        return list(zip(self.rows, self.cols or (), strict=False))

    def describe(self) -> str:
        """Short human-readable description, e.g. ``hierarchical [(7, 7), (2, 2), (2, 2)]``."""
        text = f"{self.kind} {self.spatial_sites}"
        if self.channels > 1:
            text += f" + channel site {self.channels}"
        if (self.padded_height, self.padded_width) != (self.height, self.width):
            text += f", padded {self.height}x{self.width} -> {self.padded_height}x{self.padded_width}"
        return text

    @functools.cached_property
    def gather_index(self) -> np.ndarray:
        """``(prod(site_dims),)`` int64: for each position in site order, the flat image index it reads."""
        return _gather_index(self)

    @functools.cached_property
    def scatter_index(self) -> np.ndarray:
        """``(num_values,)`` int64: for each flat image index, its position in site order."""
        return _scatter_index(self)

    def to_sites(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., [C,] H, W)`` -> ``(..., prod(site_dims))`` in site order (padding included)."""
        flat = x.reshape(*x.shape[: x.ndim - self.image_dims], self.num_values)
        index = torch.from_numpy(self.gather_index).to(x.device)
        return flat.index_select(-1, index)

    def from_sites(self, v: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_sites`: ``(..., prod(site_dims))`` -> ``(..., [C,] H, W)``."""
        index = torch.from_numpy(self.scatter_index).to(v.device)
        flat = v.index_select(-1, index)
        shape = (self.channels, self.height, self.width) if self.channel_site else (self.height, self.width)
        return flat.reshape(*v.shape[:-1], *shape)


def make_layout(
    height: int,
    width: int,
    channels: int = 1,
    site_dims: SiteDims = None,
    channel_mode: ChannelMode = "separate",
) -> Layout:
    """Build the layout for an image size.

    Args:
        height: Image height.
        width: Image width.
        channels: Number of channels of the image (used only when ``channel_mode="site"``).
        site_dims: ``None`` for the measured default (docs/layouts.md): from 32 pixels a side a two-level
            block layout (block position, pixel in the block) with blocks of about ``size ** 0.4`` pixels a
            side (``size ** (1 / 3)`` with a channel site; at least 4), below that the plain SVD ``[H, W]``;
            ``"row"`` (the paper's five-site shapes) or ``"hierarchical"`` (Latorre's digit-by-digit
            addressing, largest prime digit first), a sequence of ints for explicit row-major sites (their
            product must be ``height * width``), or a sequence of ``(row, col)`` pairs for explicit
            hierarchical sites (row digits multiply to ``height``, column digits to ``width``).
        channel_mode: ``"separate"`` (each channel is its own MPS) or ``"site"`` (channels form the last
            site of one MPS).

    Returns:
        The layout.

    Raises:
        ValueError: site dims that do not match the image, or an unknown family or channel mode.
        TypeError: site dims of the wrong type.

    Example:
        >>> make_layout(28, 28, site_dims=[2, 4, 7, 7, 2]).site_dims
        (2, 4, 7, 7, 2)
        >>> make_layout(28, 28, site_dims="hierarchical").site_dims
        (49, 4, 4)
        >>> make_layout(28, 28).describe(), make_layout(224, 224).describe()
        ('row [28, 28]', 'hierarchical [(28, 28), (8, 8)]')
        >>> make_layout(224, 224, 3, channel_mode="site").describe()
        'hierarchical [(32, 32), (7, 7)] + channel site 3'
        >>> make_layout(1, 12).site_dims  # one row: a factorisation of its length
        (2, 3, 2)
    """
    if channel_mode not in ("separate", "site"):
        raise ValueError(f"channel_mode must be 'separate' or 'site', got {channel_mode!r}")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    site_mode = channel_mode == "site"
    site_channels = channels if site_mode else 1
    if site_channels > 1:
        channel_site: tuple[int, ...] = (site_channels,)
    else:
        channel_site = ()

    if site_dims is None:
        rule = _BLOCK_RULES[bool(channel_site)]
        if min(height, width) < 2:  # a single row or column: only a factorisation of its length splits it
            site_dims = "row"
        elif min(height, width) < rule.min_size:
            site_dims = [height, width]  # the plain matrix SVD
        else:
            (ch, fh), (cw, fw) = _block_digits(height, rule), _block_digits(width, rule)
            return _hierarchical(
                height, width, site_channels, (ch, fh), (cw, fw), ch * fh, cw * fw, channel_site, site_mode
            )
    if isinstance(site_dims, str):
        if site_dims == "row":
            ph, pw = _smooth_at_least(height), _smooth_at_least(width)
            sites = _balanced_sites(_prime_factors(ph * pw), _DEFAULT_ROW_SITES)
            if len(sites + channel_site) < 2:
                raise ValueError(
                    f"a {height}x{width} image is too small for an MPS: its pixels give the site dims {list(sites)}, "
                    "and an MPS needs at least 2 sites of size 2 or more"
                )
            _check_sites(sites + channel_site)
            return Layout(height, width, site_channels, sites + channel_site, None, None, ph, pw, site_mode)
        if site_dims == "hierarchical":
            ph, pw = _smooth_at_least(height), _smooth_at_least(width)
            rows, cols = _hierarchical_digits(ph), _hierarchical_digits(pw)
            if max(len(rows), len(cols)) < 2:  # e.g. 5x7: one digit each, no hierarchy to exploit
                return make_layout(height, width, channels, "row", channel_mode)
            return _hierarchical(height, width, site_channels, rows, cols, ph, pw, channel_site, site_mode)
        raise ValueError(
            f"site_dims must be None, 'row', 'hierarchical' or a sequence of site sizes, got {site_dims!r}"
        )

    if not isinstance(site_dims, Sequence) or len(site_dims) == 0:
        raise TypeError(f"site_dims must be a non-empty sequence, got {type(site_dims).__name__}")
    if all(isinstance(d, (tuple, list)) for d in site_dims):
        pairs = [tuple(int(v) for v in d) for d in site_dims]  # type: ignore[union-attr]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"hierarchical site_dims must be (row, col) pairs, got {list(site_dims)}")
        rows = tuple(p[0] for p in pairs)
        cols = tuple(p[1] for p in pairs)
        if math.prod(rows) != height or math.prod(cols) != width:
            raise ValueError(
                f"hierarchical site_dims {pairs} describe a {math.prod(rows)}x{math.prod(cols)} image, "
                f"but the image is {height}x{width}: row digits must multiply to the height and column "
                "digits to the width"
            )
        if any(r < 1 or c < 1 for r, c in pairs):
            raise ValueError(f"site digits must be >= 1, got {pairs}")
        return _hierarchical(height, width, site_channels, rows, cols, height, width, channel_site, site_mode)
    if all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in site_dims):
        sites = tuple(int(d) for d in site_dims)  # type: ignore[arg-type]
        if math.prod(sites) != height * width:
            raise ValueError(
                f"site_dims {list(sites)} multiply to {math.prod(sites)}, but the image has "
                f"{height}x{width} = {height * width} pixels; choose site dims whose product is the pixel count"
            )
        _check_sites(sites)
        return Layout(height, width, site_channels, sites + channel_site, None, None, height, width, site_mode)
    raise TypeError(f"site_dims must hold ints or (row, col) pairs, got {list(site_dims)!r}")


@dataclass(frozen=True)
class _BlockRule:
    """The default two-level block layout: a fine block of side about ``size ** exponent`` (at least
    ``min_fine``) for images of at least ``min_size`` pixels a side; the plain matrix SVD below."""

    exponent: float
    min_fine: int
    min_size: int


# The default layout (site_dims=None), chosen by measurement on real images (benchmarks/layouts.py; tables and
# reasons in docs/layouts.md): a two-level block layout, the SVD of the matrix (block position) x (pixel inside
# the block). One MPS per channel: fine side ~ size ** 0.4 (4 for 32x32, 8 for 224x224) from 32 pixels a side,
# the plain matrix SVD [H, W] below (28x28 Fashion-MNIST: it beat every other layout). With a channel site the
# best blocks were smaller: 4 pixels a side from 32 to 128 pixels, 6 to 7 at 224 to 227: ~ size ** (1 / 3).
_BLOCK_RULES = {False: _BlockRule(0.4, 4, 32), True: _BlockRule(1 / 3, 4, 32)}


def _check_sites(sites: tuple[int, ...]) -> None:
    if len(sites) < 2:
        raise ValueError(f"an MPS needs at least 2 sites, got site_dims {list(sites)}")
    if any(d < 2 for d in sites):
        raise ValueError(f"every site dimension must be >= 2, got {list(sites)}")


def _hierarchical(
    height: int,
    width: int,
    channels: int,
    rows: tuple[int, ...],
    cols: tuple[int, ...],
    ph: int,
    pw: int,
    channel_site: tuple[int, ...],
    site_mode: bool,
) -> Layout:
    n = max(len(rows), len(cols))
    rows = rows + (1,) * (n - len(rows))
    cols = cols + (1,) * (n - len(cols))
    sites = tuple(r * c for r, c in zip(rows, cols, strict=False))
    _check_sites(sites + channel_site)
    return Layout(height, width, channels, sites + channel_site, rows, cols, ph, pw, site_mode)


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def _smooth(n: int) -> bool:
    return max(_prime_factors(n), default=1) <= _MAX_PRIME


def _smooth_at_least(n: int) -> int:
    """Smallest size >= n whose prime factors are all <= 7 (29 -> 30, 227 -> 240)."""
    m = n
    while not _smooth(m):
        m += 1
    return m


def _block_digits(n: int, rule: _BlockRule) -> tuple[int, int]:
    """``(coarse, fine)`` digits of one side of the default block layout; ``coarse * fine >= n`` (edge padding).

    The fine block side is at least ``rule.min_fine`` (one MPS per channel: smaller blocks make a rank so
    costly that ratio 0.1 becomes unreachable) and within a factor sqrt(2) of ``n ** rule.exponent``; a side it
    divides is preferred, then the one nearest the target; a side no candidate divides is padded to a multiple
    of that nearest one.

    Example:
        >>> [_block_digits(n, _BLOCK_RULES[False]) for n in (32, 33, 100, 224, 227)]
        [(8, 4), (9, 4), (20, 5), (28, 8), (26, 9)]
        >>> [_block_digits(n, _BLOCK_RULES[True]) for n in (32, 96, 128, 224, 227)]
        [(8, 4), (24, 4), (32, 4), (32, 7), (38, 6)]
    """
    target = n**rule.exponent
    low = max(rule.min_fine, math.ceil(target / math.sqrt(2)))
    fines = range(low, max(low, math.floor(target * math.sqrt(2))) + 1)
    fine = min(fines, key=lambda f: (n % f != 0, abs(math.log(f / target))))
    return -(-n // fine), fine


def _hierarchical_digits(n: int) -> tuple[int, ...]:
    """Mixed-radix digits of a size, coarse to fine: the largest prime first (28 -> (7, 2, 2))."""
    return tuple(sorted(_prime_factors(n), reverse=True)) or (1,)


def _balanced_sites(factors: list[int], n_sites: int) -> tuple[int, ...]:
    """Group prime factors into ``n_sites`` sites of similar size, small sites at the ends.

    Reproduces the paper's Table 4 shapes: 784 -> (2, 4, 7, 7, 2), 1024 -> (4, 4, 4, 4, 4).
    """
    bins = [1] * min(n_sites, len(factors))
    for f in sorted(factors, reverse=True):
        lightest = min(range(len(bins)), key=lambda i: (bins[i], i))
        bins[lightest] *= f
    bins.sort()
    # Mountain order: alternate the smallest sites to the two ends, the largest in the middle.
    left: list[int] = []
    right: list[int] = []
    for i, b in enumerate(bins):
        (left if i % 2 == 0 else right).append(b)
    return tuple(left + right[::-1])


def _site_order_image(layout: Layout) -> np.ndarray:
    """Flat padded-image index of every position in site order."""
    c, ph, pw = layout.channels, layout.padded_height, layout.padded_width
    index = np.arange(c * ph * pw, dtype=np.int64).reshape(c, ph, pw)
    if layout.rows is None:
        # Row-major: pixels in row order, the channel (if a site) varying fastest.
        return index.reshape(c, ph * pw).T.reshape(-1)
    assert layout.cols is not None  # hierarchical: both digit tuples
    n = len(layout.rows)
    digits = index.reshape(c, *layout.rows, *layout.cols)
    # Axes: 0 = channel, 1..n = row digits, n+1..2n = column digits; interleave coarse to fine.
    order = [ax for k in range(n) for ax in (1 + k, 1 + n + k)] + [0]
    return digits.transpose(order).reshape(-1)


def _gather_index(layout: Layout) -> np.ndarray:
    _c, ph, pw = layout.channels, layout.padded_height, layout.padded_width
    padded = _site_order_image(layout)
    ch, rem = np.divmod(padded, ph * pw)
    row, col = np.divmod(rem, pw)
    # Edge padding: a padded pixel reads its nearest real pixel.
    row = np.minimum(row, layout.height - 1)
    col = np.minimum(col, layout.width - 1)
    return (ch * layout.height + row) * layout.width + col


def _scatter_index(layout: Layout) -> np.ndarray:
    ph, pw = layout.padded_height, layout.padded_width
    position = np.empty(layout.channels * ph * pw, dtype=np.int64)
    position[_site_order_image(layout)] = np.arange(position.size)
    ch, row, col = np.meshgrid(
        np.arange(layout.channels), np.arange(layout.height), np.arange(layout.width), indexing="ij"
    )
    return position[((ch * ph + row) * pw + col).reshape(-1)]
