"""The shared codec's per-item path and the ``codec="shared"`` datasets beyond Fashion-MNIST.

Per item, :meth:`SharedCoreFile.decode_one` must give exactly the pixels of the batch :meth:`SharedCoreFile.decode`
(one numba kernel serves both), checked on every image, on exact rounding ties, on colour (luma/chroma) fakes and,
with ``MPSDATA_FASHION_MNIST`` set, on real Fashion-MNIST. The datasets (CIFAR-10, ImageFolder, ImageNet val fitted
on train) must serve what the codec fitted on their training split decodes from its own encoding.
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision
from fakes import fake_images, write_cifar, write_image_folder, write_imagenet, write_mnist
from torch.utils.data import DataLoader
from torchvision.transforms import PILToTensor

import mpsdata
from mpsdata._shared import _decode_batch, _inverse, fit_shared
from mpsdata._shared_file import SharedCoreFile, write_shared_file
from mpsdata.cli import main

BUDGET = 0.3


def _file(path: Path, x: torch.Tensor, codec, mode: str = "L") -> SharedCoreFile:
    batches = [(x[s : s + 16], np.zeros(len(x[s : s + 16]))) for s in range(0, len(x), 16)]
    write_shared_file(path, codec, batches, num_samples=len(x), image_mode=mode, settings={},
                      meta={"classes": []}, progress=False)  # fmt: skip
    return SharedCoreFile(path)


def _items(cores: SharedCoreFile) -> torch.Tensor:
    """Every image through ``decode_one``, back in ``(N, C, H, W)``."""
    items = [cores.decode_one(i) for i in range(len(cores))]
    return torch.from_numpy(np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in items]))


def _torch_inverse(codec, cores: SharedCoreFile) -> torch.Tensor:
    """The images before rounding, from torch's inverse (the path other devices take), float64."""
    enc, _ = cores._encoded(np.arange(len(cores)))
    q = np.empty((len(cores), codec.num_coefficients), np.int64)
    _decode_batch(enc.data, enc.offsets, np.arange(len(cores)), codec.num_coefficients, codec.classes, codec.freq,
                  codec._cum, codec._lookup, q)  # fmt: skip
    return _inverse(torch.from_numpy(q).double() * codec.step, codec)


def _assert_torch_agrees(before: torch.Tensor, batch: torch.Tensor) -> None:
    """Torch's inverse is the same transform: rounded, it gives the kernel's pixels except, at most, on pixels whose
    float64 value lies within summation noise of a half level."""
    differ = before.round().clamp(0, 255).to(torch.uint8) != batch
    assert ((before[differ] - before[differ].floor() - 0.5).abs() < 1e-9).all()


# -- the per-item path ------------------------------------------------------------------------------------------------
def test_items_round_exact_ties_as_the_batch(tmp_path: Path) -> None:
    """A mean of 0.5 with step 1 and 1x1 blocks puts every decoded pixel on an exact tie (k + 0.5): per item and in
    batches they round half to even, as torch does."""
    x = torch.from_numpy(fake_images(40, 8, 8, seed=3))[:, None]
    fitted = fit_shared(x, step=1.0, transform="dct", block=1, dc_transform=False, rdoq=0.0)
    codec = dataclasses.replace(fitted, mean=np.full_like(fitted.mean, 0.5))
    cores = _file(tmp_path / "ties.h5", x, codec)
    batch = cores.decode(np.arange(len(cores)))
    before = _torch_inverse(codec, cores)
    assert (before.frac() == 0.5).all()  # every pixel is a tie
    assert torch.equal(_items(cores), batch)
    assert torch.equal(batch, before.round().clamp(0, 255).to(torch.uint8))  # half to even, as torch.round
    assert (batch % 2 == 0).all() and len(torch.unique(batch)) > 20


@pytest.mark.parametrize(
    ("transform", "block", "colour"),
    [("pca", 8, "ycc"), ("pca", 16, "rgb"), ("dct", 4, "ycc"), ("dct", 8, "rgb")],
)
def test_colour_items_equal_the_batch(tmp_path: Path, transform: str, block: int, colour: str) -> None:
    x = torch.from_numpy(fake_images(48, 16, 16, channels=3, seed=5).transpose(0, 3, 1, 2).copy())
    codec = fit_shared(x[:32], step=3.0, transform=transform, block=block, colour=colour)
    assert codec.colour == colour and codec.dc_transform == (transform == "dct")
    cores = _file(tmp_path / "rgb.h5", x, codec, mode="RGB")
    batch = cores.decode(np.arange(len(cores)))
    assert torch.equal(_items(cores), batch)
    assert torch.equal(cores.decode(np.arange(len(cores))[::-1].copy()), batch.flip(0))  # order and batch size
    assert torch.equal(codec.decode(codec.encode(x)), batch)
    _assert_torch_agrees(_torch_inverse(codec, cores), batch)


def test_real_fashion_items_equal_the_batch(fashion_dir: Path, tmp_path: Path) -> None:
    """1,000 real test images, codec fitted on 1,000 training images: ~0.8 million pixels, hundreds of them within
    1e-3 of a half level, all the same per item as in the batch."""

    def read(name: str, count: int) -> torch.Tensor:
        with gzip.open(fashion_dir / name) as f:
            data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        return torch.from_numpy(data[:count].copy())[:, None]

    train, test = read("train-images-idx3-ubyte.gz", 1000), read("t10k-images-idx3-ubyte.gz", 1000)
    codec = fit_shared(train, bytes_ratio=0.2)
    cores = _file(tmp_path / "fashion.h5", test, codec)
    batch = cores.decode(np.arange(len(cores)))
    assert torch.equal(_items(cores), batch)
    before = _torch_inverse(codec, cores)
    near = ((before - before.floor() - 0.5).abs() < 1e-3) & (before > 0) & (before < 255)
    assert near.sum() > 200  # rounding-boundary pixels were among those compared
    _assert_torch_agrees(before, batch)


# -- datasets ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake CIFAR pickles have other md5 sums; patch the check as torchvision's own tests do."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


def _assert_serves_the_codec(ds, codec, images: np.ndarray) -> None:
    """Items and batches equal the codec's decode of its own encoding of ``images`` (uint8 (N, C, H, W))."""
    expected = codec.decode(codec.encode(torch.from_numpy(images)))
    assert torch.equal(ds.decode_batch(np.arange(len(ds))), expected)
    for i in range(len(ds)):
        image, _ = ds[i]
        assert torch.equal(PILToTensor()(image), expected[i])


def test_cifar10_colour_splits(tmp_path: Path, no_md5: None) -> None:
    splits = write_cifar(tmp_path, per_batch=8, num_test=12)
    test = mpsdata.MPSCIFAR10(tmp_path, train=False, codec="shared", bytes_ratio=BUDGET)  # builds train first
    train = mpsdata.MPSCIFAR10(tmp_path, codec="shared", bytes_ratio=BUDGET)
    codec = train._cores.codec
    assert codec.shape == (3, 32, 32) and codec.colour in ("ycc", "rgb")
    assert test._cores.meta["shared_fit"]["split"] == "train" and test._cores.meta["shared_fit"]["images"] == 40
    assert train._cores.amortised_bytes_ratio <= BUDGET
    for ds, split in ((train, "train"), (test, "test")):
        _assert_serves_the_codec(ds, codec, splits[split].images.transpose(0, 3, 1, 2).copy())
        assert ds.targets == splits[split].labels.tolist() and ds[0][0].mode == "RGB"
    # whichever colour handling the search chose, the other one serves CIFAR items the same way
    other = "rgb" if codec.colour == "ycc" else "ycc"
    train_x, test_x = (torch.from_numpy(splits[s].images).permute(0, 3, 1, 2).contiguous() for s in ("train", "test"))
    refit = fit_shared(train_x, step=8.0, transform="dct", block=8, colour=other)
    cores = _file(tmp_path / "other.h5", test_x, refit, mode="RGB")
    assert torch.equal(_items(cores), refit.decode(refit.encode(test_x)))


def test_cifar10_budget_too_small(tmp_path: Path, no_md5: None) -> None:
    write_cifar(tmp_path, per_batch=4, num_test=4)
    with pytest.raises(ValueError, match=r"cannot fit the shared codec for .*train-.*\.h5 at bytes_ratio=0\.0005 .*"
                                         r"images of shape \(3, 32, 32\)"):  # fmt: skip
        mpsdata.MPSCIFAR10(tmp_path, train=False, codec="shared", bytes_ratio=0.0005)
    assert not list(tmp_path.rglob("*.h5"))  # neither split left a file behind


def test_image_folder_fits_on_itself(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    write_image_folder(root)
    ds = mpsdata.MPSImageFolder(root, image_size=16, build_workers=0, codec="shared", bytes_ratio=BUDGET)
    assert len(ds) == 12 and ds._cores.meta["shared_fit"] == {
        "split": ds._split, "images": 12, "codec": ds._cores.codec.describe()
    }  # fmt: skip
    images = torch.cat([torch.as_tensor(x) for x, _ in ds._source().batches(64)]).numpy()
    _assert_serves_the_codec(ds, ds._cores.codec, images)
    assert ds.targets == torchvision.datasets.ImageFolder(root).targets


def test_imagenet_val_projects_onto_the_train_fit(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    for k, wnid in enumerate(("n01440764", "n01443537", "n01484850")):  # torchvision's unpacked val layout
        for i in range(2):
            path = tmp_path / "val" / wnid / f"ILSVRC2012_val_{k}{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(fake_images(1, 19, 23, channels=3, seed=50 + 2 * k + i)[0]).save(path, quality=95)
    val = mpsdata.MPSImageNet(tmp_path, split="val", image_size=16, build_workers=0, codec="shared",
                              bytes_ratio=BUDGET)  # fmt: skip
    train = mpsdata.MPSImageNet(tmp_path, image_size=16, build_workers=0, codec="shared", bytes_ratio=BUDGET)
    fit = val._cores.meta["shared_fit"]
    assert fit["split"] == "train" and fit["images"] == len(train) == 9
    assert fit["file"] == train.archive.name and fit["content_sha256"] == train._cores.content_sha256
    codec = train._cores.codec
    assert val._cores.codec.state()[1] == codec.state()[1]
    images = torch.cat([torch.as_tensor(x) for x, _ in val._source().batches(64)]).numpy()
    assert len(val) == 6 and val.targets == [0, 0, 1, 1, 2, 2]
    _assert_serves_the_codec(val, codec, images)


# -- data loaders -----------------------------------------------------------------------------------------------------
def test_dataloader_spawn_worker_matches_main_process(tmp_path: Path) -> None:
    write_mnist(tmp_path / "FashionMNIST" / "raw", num_train=24, num_test=12, gz=False)
    ds = mpsdata.MPSFashionMNIST(tmp_path, train=False, codec="shared", bytes_ratio=BUDGET, transform=PILToTensor())
    ds[0]  # the parent's handle and byte strings must not travel to the worker
    expected = list(DataLoader(ds, batch_size=5))
    got = list(DataLoader(ds, batch_size=5, num_workers=1, multiprocessing_context="spawn"))
    assert len(got) == len(expected) == 3
    for (x, y), (x_ref, y_ref) in zip(got, expected):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


# -- publishing -------------------------------------------------------------------------------------------------------
def test_pack_and_download_shared_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`pack` publishes shared-codec files; a dataset with download=True fetches its split's file, with no raw data
    and no training split on the machine."""
    from mpsdata.download import MIRROR_ENV, find_published, pack

    monkeypatch.delenv(MIRROR_ENV, raising=False)
    built_root, fresh_root = tmp_path / "built", tmp_path / "fresh"
    write_mnist(built_root / "FashionMNIST" / "raw", num_train=20, num_test=8, gz=False)
    options = {"codec": "shared", "bytes_ratio": BUDGET}
    test = mpsdata.MPSFashionMNIST(built_root, train=False, **options)
    out = tmp_path / "public"
    (entry,) = pack([test.archive], out)  # verifies: checksums and every image decoded
    assert entry["format_version"] == 4 and entry["settings"]["codec"] == "shared" and entry["num_samples"] == 8
    assert find_published(test._cores.settings, mirrors=[out]) == entry
    fetched = mpsdata.MPSFashionMNIST(fresh_root, train=False, download=True, mirrors=[out], **options)
    assert fetched.archive.name == test.archive.name and not (fresh_root / "FashionMNIST" / "raw").exists()
    assert list(fetched.archive.parent.glob("train-*.h5")) == []  # the training split was not needed
    assert torch.equal(fetched.decode_batch(np.arange(8)), test.decode_batch(np.arange(8)))
    assert fetched._cores.content_sha256 == test._cores.content_sha256
    assert main(["download", "--list", "--mirror", str(out)]) == 0
    listed = capsys.readouterr().out
    assert entry["name"] in listed and "'codec': 'shared'" in listed and f"'bytes_ratio': {BUDGET}" in listed
    # an entry of a newer shared format is not offered to this reader
    assert find_published(test._cores.settings, manifest=[{**entry, "format_version": 5}]) is None
