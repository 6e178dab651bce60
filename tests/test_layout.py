"""Layouts: how pixels become MPS sites (``mpsdata._layout``).

The reference orders below are written independently of the implementation: row-major is the image's own
flat order (channel fastest when it is a site), hierarchical is mixed-radix digit addressing, coarse to fine,
with the row digit and the column digit of each level sharing a site (Latorre 2005).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import mpsdata
from mpsdata._layout import Layout, make_layout

SIZES = [(2, 2), (2, 3), (3, 3), (4, 4), (5, 7), (8, 8), (12, 20), (13, 17), (28, 28), (29, 31), (32, 32), (40, 37)]
FAMILIES = [None, "row", "hierarchical"]


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def _reference_sites(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Site-order values of ``x`` (``([C,] H, W)``), computed position by position from the layout's digits."""
    image = x if layout.channels > 1 else x[None]
    c, ph, pw = layout.channels, layout.padded_height, layout.padded_width
    out = []
    for p in range(c * ph * pw):
        if layout.rows is None:
            pixel, ch = divmod(p, c)
            row, col = divmod(pixel, pw)
        else:
            rest, ch = divmod(p, c)
            # Digits of p, most significant first: (r_1, c_1, r_2, c_2, ..., r_n, c_n).
            radices = [r for pair in zip(layout.rows, layout.cols, strict=True) for r in pair]
            digits = []
            for radix in reversed(radices):
                rest, digit = divmod(rest, radix)
                digits.append(digit)
            digits.reverse()
            row = col = 0
            for k, (r, cc) in enumerate(zip(layout.rows, layout.cols, strict=True)):
                row = row * r + digits[2 * k]
                col = col * cc + digits[2 * k + 1]
        # Edge padding: a padded position repeats the nearest real pixel.
        out.append(image[ch, min(row, layout.height - 1), min(col, layout.width - 1)])
    return torch.stack(out)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_round_trip_is_identity(height: int, width: int, family: str | None) -> None:
    layout = make_layout(height, width, site_dims=family)
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    sites = layout.to_sites(x)
    assert sites.shape == (2, 3, math.prod(layout.site_dims))
    assert torch.equal(layout.from_sites(sites), x)


@pytest.mark.parametrize("family", ["row", "hierarchical"])
@pytest.mark.parametrize(("height", "width"), [(4, 4), (5, 7), (12, 20), (29, 31)])
def test_round_trip_with_colour_site(height: int, width: int, family: str) -> None:
    layout = make_layout(height, width, 3, site_dims=family, channel_mode="site")
    assert layout.site_dims[-1] == 3
    assert layout.channels == 3 and layout.num_values == 3 * height * width
    x = torch.randn(5, 3, height, width)
    sites = layout.to_sites(x)
    assert sites.shape == (5, math.prod(layout.site_dims))
    assert torch.equal(layout.from_sites(sites), x)


@pytest.mark.parametrize(
    ("height", "width", "channels", "site_dims"),
    [
        (4, 4, 1, [(2, 2), (2, 2)]),
        (8, 8, 1, "hierarchical"),
        (28, 28, 1, [(7, 7), (2, 2), (2, 2)]),
        (12, 10, 1, [(3, 5), (2, 2), (2, 1)]),
        (29, 31, 1, "hierarchical"),
        (13, 17, 1, "row"),
        (6, 10, 1, [2, 5, 6]),
        (5, 7, 3, "row"),
        (12, 20, 3, "hierarchical"),
        (29, 31, 3, "hierarchical"),
    ],
)
def test_site_order_matches_digit_addressing(height: int, width: int, channels: int, site_dims) -> None:
    mode = "site" if channels > 1 else "separate"
    layout = make_layout(height, width, channels, site_dims=site_dims, channel_mode=mode)
    x = torch.randn((channels, height, width) if channels > 1 else (height, width), dtype=torch.float64)
    assert torch.equal(layout.to_sites(x), _reference_sites(x, layout))


def test_hierarchical_first_site_positions_are_the_top_left_block() -> None:
    layout = make_layout(4, 4, site_dims=[(2, 2), (2, 2)])
    x = torch.arange(16.0).reshape(4, 4)
    sites = layout.to_sites(x)
    assert sites[:4].tolist() == x[:2, :2].reshape(-1).tolist()
    assert sites[4:8].tolist() == x[:2, 2:].reshape(-1).tolist()
    assert sites[8:12].tolist() == x[2:, :2].reshape(-1).tolist()
    assert sites[12:].tolist() == x[2:, 2:].reshape(-1).tolist()


def test_hierarchical_sites_are_quadtree_levels() -> None:
    # 8x8 on three (2, 2) levels: the first site picks a 4x4 quadrant, the second a 2x2 quadrant inside it.
    layout = make_layout(8, 8, site_dims=[(2, 2)] * 3)
    assert layout.site_dims == (4, 4, 4)
    x = torch.arange(64.0).reshape(8, 8)
    tensor = layout.to_sites(x).reshape(4, 4, 4)
    for q in range(4):
        r, c = divmod(q, 2)
        quadrant = x[4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
        assert torch.equal(tensor[q].reshape(-1), layout_of_4x4(quadrant))


def layout_of_4x4(block: torch.Tensor) -> torch.Tensor:
    """Quadrant order of a 4x4 block: its four 2x2 quadrants, each row by row."""
    return torch.cat([block[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(-1) for r in range(2) for c in range(2)])


def test_row_major_is_flat_order() -> None:
    layout = make_layout(28, 28, site_dims=[2, 4, 7, 7, 2])
    x = torch.randn(3, 28, 28)
    assert torch.equal(layout.to_sites(x), x.reshape(3, -1))
    assert layout.kind == "row" and layout.rows is None


def test_padding_replicates_edges_and_is_dropped_on_the_way_back() -> None:
    layout = make_layout(29, 31, site_dims="row")
    assert (layout.padded_height, layout.padded_width) == (30, 32)
    x = torch.randn(29, 31, dtype=torch.float64)
    padded = torch.nn.functional.pad(x[None, None], (0, 1, 0, 1), mode="replicate")[0, 0]
    assert torch.equal(layout.to_sites(x), padded.reshape(-1))
    assert "padded 29x31 -> 30x32" in layout.describe()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_indices_are_consistent(height: int, width: int, family: str | None) -> None:
    layout = make_layout(height, width, site_dims=family)
    gather, scatter = layout.gather_index, layout.scatter_index
    n_sites = math.prod(layout.site_dims)
    assert n_sites == layout.padded_height * layout.padded_width
    assert gather.shape == (n_sites,) and scatter.shape == (layout.num_values,)
    # Every pixel is read, and reading back the positions it was scattered to returns the pixel itself.
    assert set(gather.tolist()) == set(range(layout.num_values))
    assert np.array_equal(gather[scatter], np.arange(layout.num_values))
    if n_sites == layout.num_values:  # no padding: a permutation
        assert np.array_equal(np.sort(gather), np.arange(n_sites))
        v = torch.randn(n_sites)
        assert torch.equal(layout.to_sites(layout.from_sites(v)), v)


def test_default_layouts_for_every_size() -> None:
    for height in range(2, 41):
        for width in range(2, 41):
            for family in FAMILIES:
                layout = make_layout(height, width, site_dims=family)
                where = f"{height}x{width} {family}: {layout.describe()}"
                assert layout.num_sites >= 2, where
                assert min(layout.site_dims) >= 2, where
                assert layout.padded_height >= height and layout.padded_width >= width, where
                assert math.prod(layout.site_dims) == layout.padded_height * layout.padded_width, where
                if family is not None:  # the families factor the (padded) size into small primes
                    assert max(_prime_factors(layout.padded_height * layout.padded_width), default=1) <= 7, where
                if family == "row":
                    assert layout.kind == "row"


def test_default_is_the_measured_choice() -> None:
    # docs/layouts.md: the plain matrix SVD below 32 px a side, a two-level block layout from 32 px, with
    # smaller blocks when the channels are a site.
    svd = make_layout(28, 28)
    assert (svd.kind, svd.site_dims, svd.padded_height) == ("row", (28, 28), 28)
    assert make_layout(29, 31).site_dims == (29, 31)  # no padding: the SVD needs no factorisation
    assert make_layout(28, 28, 3, channel_mode="site").site_dims == (28, 28, 3)
    for size, (coarse, fine) in [(32, (8, 4)), (64, (16, 4)), (100, (20, 5)), (224, (28, 8))]:
        layout = make_layout(size, size)
        assert (layout.rows, layout.cols) == ((coarse, fine), (coarse, fine)), size
        assert layout.site_dims == (coarse**2, fine**2) and layout.padded_height == size, size
    for size, (coarse, fine) in [(32, (8, 4)), (96, (24, 4)), (128, (32, 4)), (224, (32, 7))]:
        layout = make_layout(size, size, 3, channel_mode="site")
        assert (layout.rows, layout.site_dims) == ((coarse, fine), (coarse**2, fine**2, 3)), size
    assert make_layout(128, 128, 1, channel_mode="site").site_dims == (256, 64)  # one channel: no channel site
    padded = make_layout(227, 227)  # 227 is prime: edge padding to a multiple of the fine block
    assert (padded.rows, padded.padded_height, padded.padded_width) == ((26, 9), 234, 234)


def test_default_two_site_layout_is_the_truncated_matrix_svd() -> None:
    x = torch.randn(28, 28, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(x)
    m = mpsdata.decompose(x, bond_dims=[5])
    assert torch.allclose(m.reconstruct(), u[:, :5] @ torch.diag(s[:5]) @ vh[:5], atol=1e-9)


@pytest.mark.parametrize(
    ("height", "width"),
    [(1, 12), (12, 1), (1, 1000), (2, 1000), (31, 500), (500, 31), (32, 1000), (229, 64), (227, 227), (33, 97)],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_default_layout_for_awkward_sizes(height: int, width: int, channels: int) -> None:
    mode = "site" if channels > 1 else "separate"
    layout = make_layout(height, width, channels, channel_mode=mode)
    assert layout.num_sites >= 2 and min(layout.site_dims) >= 2, layout.describe()
    if min(height, width) >= 32:  # the block layout pads less than one fine block
        assert 0 <= layout.padded_height - height < layout.rows[-1]
        assert 0 <= layout.padded_width - width < layout.cols[-1]
    shape = (channels, height, width) if channels > 1 else (height, width)
    x = torch.randn(2, *shape, dtype=torch.float64)
    assert torch.equal(layout.from_sites(layout.to_sites(x)), x)


def test_known_shapes() -> None:
    assert make_layout(28, 28, site_dims="row").site_dims == (2, 4, 7, 7, 2)  # paper Table 4
    assert make_layout(32, 32, site_dims="row").site_dims == (4, 4, 4, 4, 4)  # paper Table 4
    hier = make_layout(28, 28, site_dims="hierarchical")
    assert (hier.rows, hier.cols, hier.site_dims) == ((7, 2, 2), (7, 2, 2), (49, 4, 4))
    assert make_layout(6, 10, 3, site_dims=[2, 5, 6], channel_mode="site").site_dims == (2, 5, 6, 3)
    # With separate channels the channel count does not enter the layout.
    assert make_layout(6, 10, 3, site_dims=[2, 5, 6]).site_dims == (2, 5, 6)


def test_explicit_int_sites_product_mismatch_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"(?s)392.*784"):
        make_layout(28, 28, site_dims=[2, 4, 7, 7])


def test_explicit_pair_sites_mismatch_names_both_sizes() -> None:
    with pytest.raises(ValueError, match=r"(?s)14x14.*28x28"):
        make_layout(28, 28, site_dims=[(7, 7), (2, 2)])


@pytest.mark.parametrize("site_dims", [3, 2.5, [2.0, 392], [(2, 2), 196], [True, 784]])
def test_site_dims_of_the_wrong_type(site_dims) -> None:
    with pytest.raises(TypeError, match="site_dims"):
        make_layout(28, 28, site_dims=site_dims)


def test_empty_site_dims() -> None:
    with pytest.raises((TypeError, ValueError), match="site_dims"):
        make_layout(28, 28, site_dims=[])


@pytest.mark.parametrize("site_dims", [[784], [(28, 28)]])
def test_fewer_than_two_sites(site_dims) -> None:
    with pytest.raises(ValueError, match="2 sites"):
        make_layout(28, 28, site_dims=site_dims)


@pytest.mark.parametrize(("height", "width"), [(1, 5), (7, 1), (1, 1)])
def test_default_layout_never_has_fewer_than_two_sites(height: int, width: int) -> None:
    # A prime number of pixels cannot be split into sites: this must be an error, not a one-site "MPS".
    with pytest.raises(ValueError, match="2 sites"):
        make_layout(height, width)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"site_dims": [1, 784]}, ">= 2"),
        ({"site_dims": [(2, 2, 7), (14, 14)]}, "pairs"),
        ({"site_dims": "columns"}, re.escape("'row', 'hierarchical'")),
        ({"channel_mode": "stacked"}, "channel_mode"),
    ],
)
def test_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_layout(28, 28, **kwargs)


def test_non_positive_size() -> None:
    with pytest.raises(ValueError, match="0x5"):
        make_layout(0, 5)
