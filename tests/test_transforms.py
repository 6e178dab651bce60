"""``MPSCompress`` as a torchvision transform, checked the way torchvision checks its own (``check_transform``)."""

from __future__ import annotations

import inspect
import pickle
import warnings
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms as transforms_v1
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

import mpsdata
import mpsdata.transforms as transforms_module
from mpsdata import MPSCompress


def _call_without_warnings(transform, inpt):
    """Call ``transform`` and fail on any warning, whatever the configured filters say."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = transform(inpt)
    messages = [f"{w.category.__name__}: {w.message}" for w in caught if "numba" not in w.category.__module__]
    assert not messages, messages
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, PIL.Image.Image):
        return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()
    return type(a) is type(b) and torch.equal(a, b)


def _snapshot(inpt: Any) -> Any:
    return inpt.copy() if isinstance(inpt, PIL.Image.Image) else inpt.clone()


def check_transform(transform: MPSCompress, inpt: Any) -> Any:
    """The shared checks: input untouched, type/shape/dtype/device kept, no warnings, pickles, composes."""
    before = _snapshot(inpt)
    out = _call_without_warnings(transform, inpt)
    assert _same(inpt, before), "the input was modified"
    assert type(out) is type(inpt)
    if isinstance(inpt, PIL.Image.Image):
        assert (out.mode, out.size) == (inpt.mode, inpt.size)
    else:
        assert out.shape == inpt.shape and out.dtype == inpt.dtype and out.device == inpt.device
        assert out.data_ptr() != inpt.data_ptr() or inpt.numel() == 0
    # Deterministic: the same input gives the same output, also after a pickle round trip.
    assert _same(transform(inpt), out)
    restored = pickle.loads(pickle.dumps(transform))
    assert repr(restored) == repr(transform)
    assert _same(restored(inpt), out)
    # Inside torchvision pipelines, v1 and v2.
    assert _same(transforms_v1.Compose([transform])(inpt), out)
    assert _same(v2.Compose([transform])(inpt), out)
    return out


def _image(shape, dtype=torch.uint8, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return torch.rand(shape, generator=gen).to(dtype)


def _reference(x: torch.Tensor, **options: Any) -> mpsdata.MPS:
    """What MPSCompress computes by default: the channels of a ``[..., C, H, W]`` image folded in as a site."""
    return mpsdata.decompose(x, channel_mode="site" if x.ndim >= 3 else "separate", **options)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(3, 28, 28), (1, 12, 20), (2, 3, 16, 16), (28, 28)])
def test_tensor_checks(shape, dtype) -> None:
    transform = MPSCompress(ratio=0.4)
    x = _image(shape, dtype)
    out = check_transform(transform, x)
    # The output is the MPS approximation, not the input.
    expected = _reference(x, ratio=0.4).reconstruct(torch.uint8 if dtype == torch.uint8 else None)
    if dtype != torch.uint8:
        expected = expected.clamp(0, 1).to(dtype)
    assert torch.equal(out, expected)
    assert not torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_batched_equals_unbatched(dtype) -> None:
    transform = MPSCompress(ratio=0.5, residual=1)
    x = _image((70, 3, 12, 20), dtype)
    out = transform(x)
    for i in (0, 1, 64, 69):
        assert torch.equal(transform(x[i]), out[i])
    empty = check_transform(transform, x[:0])
    assert empty.shape == (0, 3, 12, 20) and empty.dtype == dtype


def test_colour_site_batched_equals_unbatched() -> None:
    transform = MPSCompress(ratio=0.5, channel_mode="site")
    x = _image((5, 3, 16, 16))
    out = check_transform(transform, x)
    assert torch.equal(transform(x[3]), out[3])
    assert torch.equal(out, mpsdata.decompose(x, ratio=0.5, channel_mode="site").reconstruct(torch.uint8))


def test_uint8_stays_in_range_and_is_rounded() -> None:
    # A saturated binary image: its approximation overshoots 0..255, the transform must clamp.
    x = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(1)) > 0.5).to(torch.uint8) * 255
    raw = _reference(x, ratio=0.3).reconstruct()
    assert raw.min() < 0 and raw.max() > 255  # the clamp is exercised
    out = MPSCompress(ratio=0.3)(x)
    assert out.dtype == torch.uint8
    assert torch.equal(out, raw.add(0.5).floor().clamp(0, 255).to(torch.uint8))


def test_float_unit_range_stays_in_unit_range() -> None:
    x = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    raw = _reference(x, ratio=0.3).reconstruct()
    assert raw.min() < 0 and raw.max() > 1
    out = MPSCompress(ratio=0.3)(x)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, raw.clamp(0, 1))


def test_float_outside_unit_range_is_not_clamped() -> None:
    # Normalised images (here -1..1) keep their scale: clamping them to [0, 1] would destroy them.
    x = torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    out = MPSCompress(ratio=0.4)(x)
    assert torch.equal(out, _reference(x, ratio=0.4).reconstruct())
    assert out.min() < 0


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_pil_in_pil_out(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch warns about a read-only numpy array only once per process, so a warning check alone depends on
    # test order: refuse read-only arrays directly.
    from_numpy = torch.from_numpy

    def writable_only(array: np.ndarray) -> torch.Tensor:
        assert array.flags.writeable, "torch.from_numpy got a read-only array (torch warns: not writable)"
        return from_numpy(array)

    monkeypatch.setattr(torch, "from_numpy", writable_only)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)  # height 20, width 24: a swap would show
    img = PIL.Image.fromarray(array, "RGBA").convert(mode)
    out = check_transform(MPSCompress(ratio=0.4), img)
    assert out.size == (24, 20)
    # Same pixels as the tensor path on the same image.
    expected = MPSCompress(ratio=0.4)(F.pil_to_tensor(img))
    assert torch.equal(F.pil_to_tensor(out), expected)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_constant_alpha_is_kept(mode: str) -> None:
    """An opaque image keeps its alpha exactly; its colour is compressed as the colour bands alone would be.
    Compressed with the colour in one MPS (the tensor path, which cannot know a band is alpha), it comes back
    uneven."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    array[:, :, 3] = 255
    img = PIL.Image.fromarray(array, "RGBA").convert(mode)
    out = check_transform(MPSCompress(ratio=0.4), img)
    got = F.pil_to_tensor(out)
    assert bool((got[-1] == 255).all())
    assert torch.equal(got[:-1], MPSCompress(ratio=0.4)(F.pil_to_tensor(img)[:-1]))
    joint = MPSCompress(ratio=0.4)(F.pil_to_tensor(img))[-1]
    print(f"alpha compressed with the colour: min {int(joint.min())}")  # pytest -s: 250 (LA), 246 (RGBA) here
    assert int(joint.min()) < 255


@pytest.mark.parametrize(("mode", "scale"), [("F", 1.0), ("F", 1 / 255), ("I", 70000.0), ("I;16", 250.0)])
def test_pil_wide_modes(mode: str, scale: float) -> None:
    """One-band float and wide-integer images come back in their mode, as the float tensor path computes them
    (integers rounded half up and clamped to their type)."""
    ramp = np.add.outer(np.arange(20), np.arange(24)) / 42  # rank 2: an MPS at ratio 0.4 holds it
    values = (ramp + 0.05 * np.random.default_rng(0).random((20, 24))) / 1.05 * 255 * scale
    dtype = {"F": np.float32, "I": np.int32, "I;16": np.uint16}[mode]
    img = PIL.Image.fromarray(values.astype(dtype))
    assert img.mode == mode
    out = check_transform(MPSCompress(ratio=0.4), img)
    assert out.size == (24, 20)
    x = torch.from_numpy(np.asarray(img).astype(np.float64 if mode == "I" else np.float32))
    expected = MPSCompress(ratio=0.4)(x[None])[0].numpy()
    got = np.asarray(out)
    if mode == "F":
        assert np.array_equal(got, expected)
        assert (got.min() >= 0 and got.max() <= 1) == (scale < 1)  # a [0, 1] image stays in [0, 1]
    else:
        info = np.iinfo(dtype)
        assert np.array_equal(got, np.clip(np.floor(expected + 0.5), info.min, info.max).astype(dtype))
        assert np.abs(got.astype(np.float64) - values).mean() < 0.05 * values.mean()  # an approximation, not junk


@pytest.mark.parametrize("mode", ["P", "1", "I;16B"])
def test_unsupported_pil_mode(mode: str) -> None:
    img = PIL.Image.new("RGB", (8, 8), (10, 20, 30)).convert(mode)
    with pytest.raises(TypeError, match=f"mode '{mode}'"):
        MPSCompress(ratio=0.4)(img)


def test_tv_tensors_keep_their_type() -> None:
    transform = MPSCompress(ratio=0.4)
    x = _image((3, 28, 28))
    image = tv_tensors.Image(x)
    out = check_transform(transform, image)
    assert torch.equal(out.as_subclass(torch.Tensor), transform(x))
    video = tv_tensors.Video(_image((4, 3, 16, 16)))
    out = check_transform(transform, video)
    assert torch.equal(out.as_subclass(torch.Tensor), transform(video.as_subclass(torch.Tensor)))


def test_v2_sample_passes_the_rest_through() -> None:
    transform = MPSCompress(ratio=0.4)
    x = _image((3, 28, 28))
    image = tv_tensors.Image(x)
    boxes = tv_tensors.BoundingBoxes([[1, 2, 10, 12]], format="XYXY", canvas_size=(28, 28))
    mask = tv_tensors.Mask(torch.ones(28, 28, dtype=torch.uint8))
    for sample in ((image, 3, boxes, mask), {"image": image, "label": 3, "boxes": boxes, "mask": mask}):
        out = transform(sample)
        items = list(out.values()) if isinstance(out, dict) else list(out)
        assert isinstance(items[0], tv_tensors.Image)
        assert torch.equal(items[0].as_subclass(torch.Tensor), transform(x))
        assert items[1] == 3 and items[2] is boxes and items[3] is mask
    # A plain (image, label) pair as datasets return it.
    out_image, label = v2.Compose([transform])((x, 7))
    assert label == 7 and torch.equal(out_image, transform(x))


def test_in_pipelines_with_other_transforms() -> None:
    img = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8))
    pipeline = transforms_v1.Compose([MPSCompress(ratio=0.4), transforms_v1.ToTensor()])
    out = pipeline(img)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    assert torch.equal(out, MPSCompress(ratio=0.4)(F.pil_to_tensor(img)).float() / 255)
    pipeline2 = v2.Compose([v2.PILToTensor(), MPSCompress(ratio=0.4), v2.ToDtype(torch.float32, scale=True)])
    assert torch.allclose(pipeline2(img), out, atol=1e-6)


def test_wrong_tensor_input() -> None:
    with pytest.raises(TypeError, match="uint8 or float.*int32"):
        MPSCompress(ratio=0.4)(torch.zeros(3, 8, 8, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------
def test_repr_shows_the_options() -> None:
    assert repr(MPSCompress(ratio=0.5)) == "MPSCompress(ratio=0.5)"  # defaults are not shown
    text = repr(
        MPSCompress(
            bond_dims=[2, 3],
            max_bond=3,
            tol=0.1,
            residual=1,
            site_dims="row",
            channel_mode="separate",
            dtype=torch.float64,
        )
    )
    for part in (
        "bond_dims=(2, 3)",
        "max_bond=3",
        "tol=0.1",
        "residual=1",
        "site_dims='row'",
        "channel_mode='separate'",
        "dtype=torch.float64",
    ):
        assert part in text, (part, text)
    assert "ratio" not in text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "give a budget"),
        ({"ratio": 1.5}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"ratio": 0.4, "bond_dims": [2, 2]}, ValueError, "either ratio"),
        ({"ratio": 0.4, "residual": -1}, ValueError, "residual must be >= 0"),
        ({"ratio": 0.4, "channel_mode": "rgb"}, ValueError, "channel_mode"),
        ({"ratio": 0.4, "dtype": torch.float16}, TypeError, "float32 or torch.float64"),
        ({"ratio": "0.4"}, TypeError, "ratio must be a number"),
        ({"max_bond": 0}, ValueError, "max_bond must be >= 1"),
    ],
)
def test_arguments_are_checked_in_init(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        MPSCompress(**kwargs)


# Non-default values for every constructor argument, split into budgets that may be combined.
_SETTINGS: list[dict[str, Any]] = [
    {"ratio": 0.6, "residual": 1, "site_dims": [4, 8, 8], "channel_mode": "separate", "dtype": torch.float64},
    {"bond_dims": [3, 4, 3], "max_bond": 3, "tol": 0.1, "site_dims": [(2, 2), (2, 2), (4, 4)]},  # + channel site
    {"bytes_ratio": 0.5, "core_dtype": "int4", "site_dims": [16, 16]},
    {"bytes_ratio": 0.6, "channel_mode": "separate", "domain": "dct", "colour": "ycc", "luma_share": 0.6},
]


def test_every_argument_is_passed_to_decompose(monkeypatch: pytest.MonkeyPatch) -> None:
    real = transforms_module.decompose
    signature = inspect.signature(real)
    calls: list[dict[str, Any]] = []

    def spy(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(transforms_module, "decompose", spy)
    names = [p for p in inspect.signature(MPSCompress.__init__).parameters if p != "self"]
    x = _image((3, 16, 16))
    seen: set[str] = set()
    for settings in _SETTINGS:
        calls.clear()
        out = MPSCompress(**settings)(x)
        assert len(calls) == 1 and out.shape == x.shape
        call = calls[0]
        assert torch.equal(call["x"], x)
        for name in names:
            if name in settings:
                value = settings[name]
                got = call.get(name, inspect.Parameter.empty)
                if isinstance(value, list):
                    got = list(got) if got is not None else got
                assert got == value, f"{name}={value!r} reached decompose as {got!r}"
                seen.add(name)
            else:
                # An argument this test does not set must still be forwarded (with its default).
                assert name in call, f"MPSCompress argument {name!r} is not passed to decompose"
    unset = set(names) - seen
    assert not unset, f"give {sorted(unset)} a non-default value in _SETTINGS so forwarding is checked"


# ---------------------------------------------------------------------------------------------------
@pytest.mark.needs_cuda
def test_cuda_tensor_stays_on_cuda() -> None:
    transform = MPSCompress(ratio=0.4)
    x = _image((8, 3, 28, 28)).cuda()
    out = check_transform(transform, x)
    assert out.device == x.device
    assert (out.cpu().int() - transform(x.cpu()).int()).abs().max() <= 1


def test_auto_layout_in_the_transform() -> None:
    x = _image((3, 16, 16))
    out = MPSCompress(ratio=0.4, site_dims="auto")(x)
    assert torch.equal(out, _reference(x, ratio=0.4, site_dims="auto").reconstruct(torch.uint8))


def test_byte_budget_output_is_what_int8_cores_hold() -> None:
    x = _image((2, 16, 16))
    out = MPSCompress(bytes_ratio=0.4, site_dims=[16, 16])(x)
    m = _reference(x, bytes_ratio=0.4, site_dims=[16, 16])
    assert torch.equal(out, m.reconstruct(torch.uint8))
    assert int(m.nbytes.max()) <= 0.4 * 2 * 256 and m.core_dtype == "int8"  # one MPS for both channels


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bytes_ratio": 0.3, "ratio": 0.3}, ValueError, "either ratio or bytes_ratio"),
        ({"bytes_ratio": 0.0}, ValueError, "positive and finite"),
        ({"bytes_ratio": "0.3"}, TypeError, "bytes_ratio must be a number"),
        ({"bytes_ratio": 0.3, "core_dtype": "int2"}, ValueError, "core_dtype must be one of"),
        ({"ratio": 0.3, "core_dtype": torch.float16}, TypeError, "core_dtype must be a string"),
    ],
)
def test_byte_budget_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MPSCompress(**kwargs)
