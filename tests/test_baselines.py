"""Baselines (``mpsdata.baselines``): contracts shared by every method, oracles, budgets, coresets, errors."""

from __future__ import annotations

import io
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, features

import mpsdata
from mpsdata import baselines as B

skimage_data = pytest.importorskip("skimage.data")

# Every reconstruction method at a budget of "about ratio r" (quality for codecs).
FACTOR = {
    "ice": lambda x, r: B.ice(x, r),
    "ice_dct": lambda x, r: B.ice(x, r, transform="dct"),
    "ice_dft": lambda x, r: B.ice(x, r, transform="dft"),
    "svd": B.svd,
    "cp": B.cp,
    "tucker": B.tucker,
    "downsample": B.downsample_upsample,
    "downsample_bilinear": lambda x, r: B.downsample_upsample(x, r, mode="bilinear"),
}
CODECS = {"jpeg": B.jpeg, "webp": B.webp, "avif": B.avif}
CODEC_FORMAT = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
CODEC_OPTIONS = {"jpeg": {"optimize": True}, "webp": {"method": 6}, "avif": {}}
CODEC_FEATURE = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}


def _needs_codec(name: str) -> None:
    if not features.check(CODEC_FEATURE[name]):
        pytest.skip(f"this Pillow has no {name} support")


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().item()


@pytest.fixture(scope="module")
def camera() -> torch.Tensor:
    """Eight 32x32 uint8 patches of skimage's camera man, from different places (sky, coat, grass)."""
    image = torch.from_numpy(skimage_data.camera())
    corners = [(40, 40), (100, 200), (200, 250), (300, 120), (380, 300), (420, 420), (150, 330), (250, 60)]
    return torch.stack([image[r : r + 32, c : c + 32] for r, c in corners])


@pytest.fixture(scope="module")
def smooth() -> torch.Tensor:
    """Six random smooth 32x32 float images (low-pass filtered noise, values around 0..1)."""
    g = torch.Generator().manual_seed(3)
    noise = torch.rand(6, 1, 48, 48, generator=g, dtype=torch.float64)
    kernel = torch.exp(-(torch.arange(-8, 9, dtype=torch.float64) ** 2) / 18)
    kernel = (kernel[:, None] * kernel[None]) / kernel.sum() ** 2
    out = torch.nn.functional.conv2d(noise, kernel[None, None])[:, 0, :32, :32]
    return (out - out.amin((1, 2), keepdim=True)) / (out.amax((1, 2), keepdim=True) - out.amin((1, 2), keepdim=True))


@pytest.fixture(scope="module")
def colour() -> torch.Tensor:
    """Four 24x24 RGB uint8 patches of skimage's astronaut, ``(4, 3, 24, 24)``."""
    image = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1)
    return torch.stack([image[:, r : r + 24, c : c + 24] for r, c in [(60, 200), (200, 180), (300, 300), (400, 60)]])


# -- the shared contract ------------------------------------------------------------------------------------
def _inputs(camera: torch.Tensor, colour: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "gray_uint8": camera[:3],
        "gray_float32_nchw": (camera[:2, None].float() / 255),
        "rgb_uint8": colour[:2],
        "rgb_float64": colour[:2].double() / 255,
    }


@pytest.mark.parametrize("name", list(FACTOR) + list(CODECS))
def test_contract_shape_dtype_budget(name: str, camera: torch.Tensor, colour: torch.Tensor) -> None:
    if name in CODECS:
        _needs_codec(name)
    for label, x in _inputs(camera, colour).items():
        before = x.clone()
        result = CODECS[name](x, 60) if name in CODECS else FACTOR[name](x, 0.4)
        assert torch.equal(x, before), f"{name} modified its input ({label})"
        assert result.images.shape == x.shape and result.images.dtype == x.dtype, label
        assert result.images.device == x.device
        assert result.nbytes.shape == (x.shape[0],) and result.nbytes.dtype == torch.int64
        assert bool((result.nbytes > 0).all())
        assert isinstance(result.method, str) and result.method
        raw = math.prod(x.shape[1:])
        assert torch.allclose(result.bytes_ratio, result.nbytes.double() / raw)
        if name in CODECS:
            assert result.ratio is None
        else:
            assert result.ratio.shape == (x.shape[0],) and bool((result.ratio <= 0.4).all()), label
        # The reconstruction is close to the image, not just any tensor of the right shape.
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        assert _mse(result.images, x) < (0.15 * scale) ** 2, (label, _mse(result.images, x))


@pytest.mark.parametrize("name", ["ice", "svd", "downsample", "jpeg"])
def test_empty_batch(name: str) -> None:
    x = torch.zeros(0, 16, 16, dtype=torch.uint8)
    result = B.jpeg(x, 50) if name == "jpeg" else FACTOR[name](x, 0.5)
    assert result.images.shape == (0, 16, 16) and result.nbytes.shape == (0,)
    assert "n/a" in repr(result)


@pytest.mark.parametrize("name", ["ice", "ice_dct", "svd", "cp", "tucker", "downsample"])
@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 20, 30), (2, 3, 16, 16)])
@pytest.mark.parametrize("ratio", [0.15, 0.33, 0.7, 1.0])
def test_ratio_never_exceeds_request_and_bytes_match(name: str, shape: tuple, ratio: float) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    result = FACTOR[name](x, ratio)
    values = math.prod(shape[1:])
    assert bool((result.ratio <= ratio + 1e-12).all())
    assert bool((result.ratio > 0).all())
    # Factor methods store float32 parameters; the downsampled image is stored at the input's dtype (float32).
    assert torch.equal(result.nbytes, (result.ratio * values * 4).round().long())


def test_higher_budget_lower_error(camera: torch.Tensor, smooth: torch.Tensor, colour: torch.Tensor) -> None:
    for name, method in FACTOR.items():
        for label, x in {"camera": camera, "smooth": smooth, "colour": colour}.items():
            errors = [_mse(method(x, r).images, x) for r in (0.2, 0.45, 0.8)]
            assert errors[0] > errors[1] > errors[2], (name, label, errors)


@pytest.mark.parametrize("name", list(CODECS))
def test_codec_higher_budget_lower_error(name: str, camera: torch.Tensor, colour: torch.Tensor) -> None:
    _needs_codec(name)
    for x in (camera, colour):
        errors = [_mse(CODECS[name](x, q).images, x) for q in (10, 50, 90)]
        assert errors[0] > errors[1] > errors[2], (name, errors)
    by_bytes = [_mse(CODECS[name](camera, bytes_ratio=b).images, camera) for b in (0.5, 0.8)]
    assert by_bytes[0] > by_bytes[1], (name, by_bytes)


# -- ICE ----------------------------------------------------------------------------------------------------
def test_ice_is_decompose_on_hierarchical_sites(camera: torch.Tensor) -> None:
    x = camera.double()
    result = B.ice(x, 0.4)
    m = mpsdata.decompose(x, 0.4, site_dims="hierarchical", dtype=torch.float64)
    # Only the rounding of the stored cores to float32 separates the two.
    assert (result.images - m.reconstruct()).abs().max().item() < 1e-3
    assert result.settings["bond_dims"] == m.bond_dims
    assert m.layout.kind == "hierarchical"
    assert torch.allclose(result.ratio, m.ratio)
    assert torch.equal(result.nbytes, m.nbytes // 2)  # float32 cores, float64 in m


@pytest.mark.parametrize("transform", [None, "dct", "dft"])
def test_ice_full_budget_is_exact(transform: str | None, camera: torch.Tensor, smooth: torch.Tensor) -> None:
    exact = B.ice(camera, max_bond=10_000, transform=transform)
    assert torch.equal(exact.images, camera), (exact.images.int() - camera.int()).abs().max()
    assert bool((exact.ratio > 1).all())  # untruncated MPS hold more values than the image
    floats = B.ice(smooth, max_bond=10_000, transform=transform)
    assert (floats.images - smooth).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    ("transform", "basis"),
    [
        ("dct", lambda j, k, n: math.sqrt(2 / n) * torch.cos(math.pi * (2 * j + 1) * k / (2 * n))),
        ("dft", lambda j, k, n: (torch.cos(2 * math.pi * j * k / n) + torch.sin(2 * math.pi * j * k / n)) / n**0.5),
    ],
)
def test_ice_transform_makes_a_basis_image_a_product_state(transform: str, basis) -> None:
    """A 2-D basis function of the transform is one coefficient there: bond dimension 1 keeps it exactly."""
    n = 16
    j = torch.arange(n, dtype=torch.float64)
    if transform == "dct":
        image = basis(j, 3, n)[:, None] * basis(j, 5, n)[None]  # separable DCT-II basis
    else:
        u, v = 3, 5  # 2-D Hartley basis: cas(2 pi (u j / n + v l / n))
        phase = 2 * math.pi * (u * j[:, None] + v * j[None]) / n
        image = (torch.cos(phase) + torch.sin(phase)) / n
    x = image[None]
    with_transform = B.ice(x, max_bond=1, transform=transform)
    assert (with_transform.images - x).abs().max().item() < 1e-6
    without = B.ice(x, max_bond=1)
    assert (without.images - x).abs().max().item() > 1e-2  # the same budget on pixels does lose it


def test_ice_budget_arguments() -> None:
    x = torch.rand(1, 16, 16)
    with pytest.raises(ValueError, match="exactly one budget"):
        B.ice(x)
    with pytest.raises(ValueError, match="exactly one budget"):
        B.ice(x, 0.5, max_bond=3)
    with pytest.raises(ValueError, match="transform must be"):
        B.ice(x, 0.5, transform="fft")
    with pytest.raises(ValueError, match="too small"):
        B.ice(x, 0.01)


# -- SVD, CP, Tucker oracles --------------------------------------------------------------------------------
def test_svd_is_the_eckart_young_truncation(smooth: torch.Tensor) -> None:
    ratio = 0.3
    result = B.svd(smooth, ratio)
    rank = math.floor(ratio * 32 * 32 / 64)
    assert result.settings["rank"] == rank
    s = torch.linalg.svdvals(smooth)
    expected = s[:, rank:].pow(2).sum(-1).sqrt()
    error = torch.linalg.matrix_norm(result.images - smooth)
    assert torch.allclose(error, expected, rtol=1e-3, atol=1e-5)


def test_cp_on_gray_matches_svd(camera: torch.Tensor) -> None:
    x = camera.double()
    cp_error = _mse(B.cp(x, 0.4).images, x)
    svd_error = _mse(B.svd(x, 0.4).images, x)
    assert cp_error <= svd_error * 1.01  # ALS from the SVD start stays at the optimum


def test_tucker_recovers_low_multilinear_rank() -> None:
    g = torch.Generator().manual_seed(1)
    core = torch.randn(4, 4, 3, generator=g, dtype=torch.float64)
    a, b, c = (torch.randn(d, r, generator=g, dtype=torch.float64) for d, r in [(20, 4), (20, 4), (3, 3)])
    hwc = torch.einsum("pqr,ip,jq,kr->ijk", core, a, b, c)
    x = hwc.permute(2, 0, 1)[None]  # (1, 3, 20, 20)
    params = 4 * 4 * 3 + 20 * 4 + 20 * 4 + 3 * 3  # the largest core this budget holds is 4 x 4 x 3
    result = B.tucker(x, params / x[0].numel())
    assert result.settings["ranks"] == (4, 4, 3)
    assert torch.allclose(result.images, x, atol=1e-4 * x.abs().max().item())


@pytest.mark.parametrize(("dims", "ratio"), [((28, 28), 0.4), ((20, 30), 0.25), ((16, 16, 3), 0.3), ((24, 24, 3), 0.9)])
def test_tucker_ranks_fit_and_are_useful(dims: tuple[int, ...], ratio: float) -> None:
    shape = (1, *dims) if len(dims) == 2 else (1, dims[2], dims[0], dims[1])
    x = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    ranks = B.tucker(x, ratio).settings["ranks"]
    params = math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks, strict=True))
    assert params <= ratio * math.prod(dims)
    for k, r in enumerate(ranks):
        assert 1 <= r <= dims[k]
        assert r <= math.prod(ranks) // r  # within the product of the other ranks


def test_downsample_keeps_the_pixel_budget_and_aspect() -> None:
    x = torch.rand(1, 20, 40, generator=torch.Generator().manual_seed(0))
    result = B.downsample_upsample(x, 0.25)
    h, w = result.settings["size"]
    assert h * w <= 0.25 * 800 and h * w >= 0.9 * 0.25 * 800
    assert abs(w / h - 2) < 0.2
    ones = torch.full((1, 3, 9, 9), 7, dtype=torch.uint8)
    assert torch.equal(B.downsample_upsample(ones, 0.3).images, ones)


@pytest.mark.parametrize(
    ("h", "w", "ratio", "pixels"), [(16, 1, 0.5, 8), (30, 2, 0.2, 12), (100, 3, 0.05, 15), (1, 16, 0.5, 8)]
)
def test_downsample_of_narrow_images_uses_its_budget(h, w, ratio, pixels) -> None:
    """A tall, narrow image keeps as many pixels as the budget allows (it kept 1x1: the side near the aspect ratio
    left no room for the other)."""
    size = B.downsample_upsample(torch.rand(2, h, w), ratio).settings["size"]
    assert size[0] * size[1] == pixels and size[0] <= h and size[1] <= w


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.floats(0.001, 1.0))
def test_downsample_size_never_exceeds_the_budget(h, w, ratio) -> None:
    budget = math.floor(ratio * h * w + 1e-9)
    if budget < 1:
        return
    hs, ws = B._small_size(h, w, ratio)
    assert 1 <= hs <= h and 1 <= ws <= w and hs * ws <= budget
    assert 2 * hs * ws >= budget  # at least half of it (2 of 3 pixels of a 2x2 image is the best there is)


# -- codecs -------------------------------------------------------------------------------------------------
def _encode(name: str, image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=CODEC_FORMAT[name], quality=quality, **CODEC_OPTIONS[name])
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("gray", [True, False])
def test_codec_bytes_are_the_file_and_the_budget_is_tight(
    name: str, gray: bool, camera: torch.Tensor, colour: torch.Tensor
) -> None:
    _needs_codec(name)
    x = camera[:3] if gray else colour[:3]
    raw = math.prod(x.shape[1:])
    bytes_ratio = 0.9 if gray else 0.5
    result = CODECS[name](x, bytes_ratio=bytes_ratio)
    budget = math.floor(bytes_ratio * raw)
    mode = "L" if gray else "RGB"
    for i in range(x.shape[0]):
        image = x[i].numpy() if gray else x[i].permute(1, 2, 0).numpy()
        q = int(result.settings["quality"][i])
        data = _encode(name, image, q)
        assert len(data) == int(result.nbytes[i]) <= budget
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
        got = result.images[i].numpy() if gray else result.images[i].permute(1, 2, 0).numpy()
        assert np.array_equal(decoded, got)
        if q < 100:  # the search stops at the highest quality that fits: one more does not
            assert len(_encode(name, image, q + 1)) > budget


def test_codec_float_input_round_trips_through_uint8(camera: torch.Tensor) -> None:
    x = camera[:2].float() / 255
    as_float = B.jpeg(x, 75)
    as_uint8 = B.jpeg(camera[:2], 75)
    assert as_float.images.dtype == torch.float32
    assert torch.equal((as_float.images * 255).round().to(torch.uint8), as_uint8.images)
    assert torch.equal(as_float.nbytes, as_uint8.nbytes)


def test_codec_errors(camera: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="exactly one budget"):
        B.jpeg(camera, 50, bytes_ratio=0.5)
    with pytest.raises(ValueError, match="exactly one budget"):
        B.webp(camera)
    with pytest.raises(ValueError, match="0..100"):
        B.jpeg(camera, 101)
    with pytest.raises(TypeError, match="quality must be an int"):
        B.jpeg(camera, 50.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        B.jpeg(camera.float(), 50)
    with pytest.raises(ValueError, match="2 channels"):
        B.jpeg(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), 50)
    with pytest.raises(ValueError, match="cannot fit image 0"):
        B.jpeg(camera, bytes_ratio=0.05)  # headers alone exceed 51 bytes
    with pytest.raises(ValueError, match="positive and finite"):
        B.webp(camera, bytes_ratio=0)


def test_codec_unsupported_raises_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "check", lambda name: False)
    with pytest.raises(ImportError, match="pip install -U pillow"):
        B.avif(torch.zeros(1, 8, 8, dtype=torch.uint8), 50)


def test_tensorly_missing_raises_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorly", None)  # makes `import tensorly` fail
    monkeypatch.setitem(sys.modules, "tensorly.decomposition", None)
    with pytest.raises(ImportError, match="pip install tensorly"):
        B.cp(torch.zeros(1, 8, 8), 0.5)


# -- argument errors shared by the reconstruction methods ---------------------------------------------------
@pytest.mark.parametrize("name", ["ice", "svd", "cp", "tucker", "downsample"])
def test_bad_arguments(name: str) -> None:
    method = FACTOR[name]
    good = torch.rand(2, 16, 16)
    with pytest.raises(TypeError, match="torch.Tensor"):
        method(good.numpy(), 0.5)
    with pytest.raises(TypeError, match="uint8 or floating"):
        method(good.to(torch.int32), 0.5)
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, C, H, W\)"):
        method(good[0], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        method(torch.full((1, 16, 16), math.nan), 0.5)
    with pytest.raises(ValueError, match="no channels"):
        method(torch.zeros(2, 0, 16, 16), 0.5)
    for ratio in (0, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]|exactly one budget"):
            method(good, ratio)
    with pytest.raises(TypeError, match="ratio must be a number"):
        method(good, "0.5")
    with pytest.raises(ValueError, match="too small|keeps no pixel"):
        method(good, 0.003)


def test_repr_shows_no_tensor_contents(camera: torch.Tensor) -> None:
    text = repr(B.svd(camera, 0.4))
    assert text.startswith("BaselineResult(method='svd rank") and "(8, 32, 32)" in text
    assert "tensor(" not in text


# -- coresets -----------------------------------------------------------------------------------------------
def test_random_coreset_size_distinct_and_seeded() -> None:
    idx = B.random_coreset(1000, 0.25, seed=7)
    assert idx.dtype == torch.int64 and idx.shape == (250,)
    assert len(set(idx.tolist())) == 250 and int(idx.min()) >= 0 and int(idx.max()) < 1000
    assert torch.equal(idx, B.random_coreset(1000, 0.25, seed=7))
    assert not torch.equal(idx, B.random_coreset(1000, 0.25, seed=8))
    assert torch.equal(B.random_coreset(1000, 0.1, seed=7), idx[:100])  # nested by ratio
    assert B.random_coreset(7, 0.3).shape == (2,)  # floor, never above the ratio


def _radius(points: torch.Tensor, centers: torch.Tensor) -> float:
    """Largest distance from a point to its nearest center."""
    return torch.cdist(points, points[centers]).amin(1).max().item()


def test_k_center_greedy_and_covering() -> None:
    g = torch.Generator().manual_seed(0)
    points = torch.randn(300, 5, generator=g, dtype=torch.float64)
    idx = B.k_center_coreset(points, 0.1, seed=1)
    assert idx.shape == (30,) and idx.dtype == torch.int64 and idx.device.type == "cpu"
    assert len(set(idx.tolist())) == 30
    assert torch.equal(idx, B.k_center_coreset(points, 0.1, seed=1))
    radii = [_radius(points, idx[:k]) for k in range(1, 31)]
    assert all(a >= b for a, b in zip(radii, radii[1:], strict=False))
    assert radii[-1] < radii[0] / 2
    for k in range(1, 30):  # farthest-point rule: the next center is the point that set the radius
        nearest = torch.cdist(points[idx[k : k + 1]], points[idx[:k]]).min().item()
        assert nearest == pytest.approx(radii[k - 1], rel=1e-9)


def test_k_center_full_ratio_duplicates_and_input_untouched() -> None:
    points = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [4.0, 0.0]])
    before = points.clone()
    idx = B.k_center_coreset(points, 1.0, seed=0)
    assert sorted(idx.tolist()) == [0, 1, 2, 3]
    assert torch.equal(points, before)
    uint8 = torch.tensor([[0, 0], [0, 1], [200, 200]], dtype=torch.uint8)
    assert sorted(B.k_center_coreset(uint8, 0.67, seed=0).tolist()) in ([0, 2], [1, 2])


def test_coreset_errors() -> None:
    with pytest.raises(ValueError, match="keeps no sample"):
        B.random_coreset(10, 0.05)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        B.random_coreset(10, 1.5)
    with pytest.raises(TypeError, match="n must be an int"):
        B.random_coreset(10.0, 0.5)
    with pytest.raises(TypeError, match="seed must be an int"):
        B.random_coreset(10, 0.5, seed="a")
    with pytest.raises(TypeError, match="torch.Tensor"):
        B.k_center_coreset(np.zeros((4, 2)), 0.5)
    with pytest.raises(TypeError, match="real numbers"):
        B.k_center_coreset(torch.zeros(4, 2, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="n >= 1"):
        B.k_center_coreset(torch.zeros(0, 2), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        B.k_center_coreset(torch.tensor([[0.0], [math.inf]]), 0.5)


# -- real Fashion-MNIST -------------------------------------------------------------------------------------
def test_fashion_budgets_and_errors(fashion_images: torch.Tensor) -> None:
    x = fashion_images[:64]
    for name in ("ice", "ice_dct", "svd", "downsample"):
        low, high = FACTOR[name](x, 0.2), FACTOR[name](x, 0.6)
        assert bool((low.ratio <= 0.2).all()) and bool((high.ratio <= 0.6).all())
        assert _mse(low.images, x) > _mse(high.images, x), name
    if features.check("webp"):
        coded = B.webp(x, bytes_ratio=0.3)
        assert bool((coded.nbytes <= math.floor(0.3 * 784)).all())
        assert _mse(coded.images, x) < _mse(B.webp(x, bytes_ratio=0.2).images, x)


def test_fashion_k_center_covers_better_than_random(fashion_images: torch.Tensor) -> None:
    points = fashion_images.reshape(len(fashion_images), -1).float()
    k_center = B.k_center_coreset(fashion_images, 0.1, seed=0)
    random = B.random_coreset(len(fashion_images), 0.1, seed=0)
    assert len(k_center) == len(random) == 51
    assert _radius(points, k_center) < _radius(points, random)


@pytest.mark.needs_cuda
def test_cuda_inputs_stay_on_cuda(camera: torch.Tensor) -> None:
    x = camera.cuda()
    for name in ("ice", "svd", "downsample"):
        result = FACTOR[name](x, 0.4)
        assert result.images.device == x.device
        assert torch.allclose(result.images.cpu().float(), FACTOR[name](camera, 0.4).images.float(), atol=2)
    points = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    on_gpu = B.k_center_coreset(points.cuda(), 0.05, seed=0)
    assert on_gpu.device.type == "cpu"
    assert _radius(points, on_gpu) == pytest.approx(_radius(points, B.k_center_coreset(points, 0.05, seed=0)), rel=0.2)


@pytest.mark.parametrize("name", ["ice", "svd", "cp", "tucker"])
@pytest.mark.parametrize("bytes_ratio", [0.6, 1.3, 2.8])
def test_factor_bytes_ratio_is_four_times_ratio(name: str, bytes_ratio: float) -> None:
    # float32 factors: a byte budget is the same factorisation as ratio = bytes_ratio / 4, and never exceeded.
    x = torch.rand(2, 20, 24, generator=torch.Generator().manual_seed(1))
    method = getattr(B, name)
    by_bytes = method(x, bytes_ratio=bytes_ratio)
    assert torch.equal(by_bytes.images, method(x, bytes_ratio / 4).images)
    assert bool((by_bytes.nbytes <= bytes_ratio * 20 * 24).all())
    with pytest.raises(ValueError, match="exactly one budget"):
        method(x, 0.2, bytes_ratio=bytes_ratio)
    with pytest.raises(ValueError, match=r"bytes_ratio must be in \(0, 4\]"):
        method(x, bytes_ratio=4.5)
