"""Per-item reads of core files holding DCT and/or luma/chroma planes (``CoreFile.decode_one``, behind
``__getitem__``) give the same uint8 image as the batch decode, item by item.

The per-item kernel contracts, inverts the DCT and the colour mix in float64 in its own order; the batch path
does the same steps in float64 with BLAS. Both round half up and clamp, so they can differ only where a value
lies within ~1e-12 of a rounding tie: the tests below require exact equality on every pixel.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import fake_images, write_mnist

import mpsdata
from mpsdata._archive import CoreFile, iterate_batches, write_core_file


def _write(tmp_path: Path, images: np.ndarray, core_dtype: str = "int8", **options) -> CoreFile:
    """A core file of ``images`` ``(N, H, W)`` or ``(N, H, W, C)`` built with ``decompose`` options."""
    channels = 1 if images.ndim == 3 else images.shape[-1]
    path = write_core_file(
        tmp_path / "cores.h5",
        iterate_batches(images, np.zeros(len(images), np.int64), 256),
        num_samples=len(images),
        image_shape=(channels, *images.shape[1:3]),
        image_mode="L" if channels == 1 else "RGB",
        options=options,
        core_dtype=core_dtype,
        settings={"residual": options.get("residual", 0)},
        meta={},
        progress=False,
    )
    return CoreFile(path)


def _assert_items_equal_batch(cores: CoreFile) -> None:
    batch = cores.decode(np.arange(cores.num_samples)).permute(0, 2, 3, 1).numpy()
    items = np.stack([cores.decode_one(i) for i in range(cores.num_samples)])
    if items.ndim == 3:
        items = items[..., None]
    assert items.dtype == np.uint8 and items.shape == batch.shape
    mismatched = int((items != batch).sum())
    assert mismatched == 0, f"{mismatched} of {batch.size} values differ from the batch decode"
    np.testing.assert_array_equal(cores.decode_one(-1), items[-1].squeeze(-1) if batch.shape[-1] == 1 else items[-1])


COLOUR_CASES = {
    "ycc separate, chroma padded": ({"colour": "ycc", "channel_mode": "separate", "bytes_ratio": 0.3}, "int8"),
    "ycc + dct separate, int4": (
        {"colour": "ycc", "domain": "dct", "channel_mode": "separate", "bytes_ratio": 0.3},
        "int4",
    ),
    "ycc + dct, channel as a site": (
        {"colour": "ycc", "domain": "dct", "channel_mode": "site", "ratio": 0.3},
        "float16",
    ),
    "dct rgb, channel site, hierarchical, residual": (
        {"domain": "dct", "channel_mode": "site", "site_dims": "hierarchical", "ratio": 0.3, "residual": 1},
        "float32",
    ),
    "dct, hierarchical, padded 22x22": (
        {"domain": "dct", "colour": "ycc", "channel_mode": "separate", "site_dims": "hierarchical", "ratio": 0.3},
        "int8",
    ),
    "ycc separate, residual": (
        {"colour": "ycc", "channel_mode": "separate", "bytes_ratio": 0.6, "residual": 1},
        "int8",
    ),
}


@pytest.mark.parametrize("case", list(COLOUR_CASES))
def test_colour_items_equal_the_batch_decode(tmp_path: Path, case: str) -> None:
    options, core_dtype = COLOUR_CASES[case]
    size = 22 if "22x22" in case else 16  # 22 = 2 x 11: the layout pads it to a smooth size
    images = fake_images(48, size, size, channels=3, seed=3)
    cores = _write(tmp_path, images, core_dtype, **options)
    assert (cores.geometry.layout.padded_height > size) == (size == 22)
    assert cores.core_dtype == core_dtype and cores.geometry.terms == options.get("residual", 0) + 1
    if case == "ycc separate, chroma padded":  # chroma planes use smaller bonds, zero-padded to luma's in the file
        ranks = cores.ranks.reshape(len(images), 3, -1)
        assert ranks[:, 1:].max() < ranks[:, 0].max()
    _assert_items_equal_batch(cores)
    # Close to the originals too: the per-item path is not just consistent with a wrong batch path.
    mse = (cores.decode(np.arange(len(images))).permute(0, 2, 3, 1).double() - torch.from_numpy(images)).square()
    torch.testing.assert_close(mse.flatten(1).mean(1), cores.mse.double(), rtol=1e-6, atol=1e-6)


def _fashion(fashion_dir: Path, count: int) -> np.ndarray:
    with gzip.open(fashion_dir / "t10k-images-idx3-ubyte.gz") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count].copy()


FASHION_CASES = {
    "hierarchical int8": ({"site_dims": "hierarchical", "bytes_ratio": 0.3}, "int8"),
    "row int4": ({"site_dims": "row", "bytes_ratio": 0.2}, "int4"),
    "[28, 28] int8, residual": ({"bytes_ratio": 0.4, "residual": 1}, "int8"),
    "hierarchical float16": ({"site_dims": "hierarchical", "ratio": 0.3}, "float16"),
}


@pytest.mark.parametrize("case", list(FASHION_CASES))
def test_real_fashion_mnist_dct_items_equal_the_batch_decode(tmp_path: Path, fashion_dir: Path, case: str) -> None:
    options, core_dtype = FASHION_CASES[case]
    cores = _write(tmp_path, _fashion(fashion_dir, 1000), core_dtype, domain="dct", **options)
    assert cores.domain == "dct" and cores.core_dtype == core_dtype
    _assert_items_equal_batch(cores)


def test_dataset_items_and_pickled_reader(tmp_path: Path) -> None:
    splits = write_mnist(tmp_path / "FashionMNIST" / "raw", num_train=8, num_test=20)
    ds = mpsdata.MPSFashionMNIST(tmp_path, train=False, bytes_ratio=0.3, domain="dct", site_dims="hierarchical")
    items = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
    np.testing.assert_array_equal(items, ds.decode_batch(range(len(ds)))[:, 0].numpy())
    assert items.shape == splits["test"].images.shape
    clone = pickle.loads(pickle.dumps(ds._cores))  # DataLoader workers get the reader by pickle
    np.testing.assert_array_equal(clone.decode_one(5), items[5])
    with pytest.raises(IndexError):
        ds._cores.decode_one(len(ds))
    # Forked DataLoader workers (after the parent used the kernel and its BLAS) read the same items.
    loader = torch.utils.data.DataLoader(
        ds, batch_size=5, num_workers=2, collate_fn=list, multiprocessing_context="fork"
    )
    np.testing.assert_array_equal(np.stack([np.asarray(image) for batch in loader for image, _ in batch]), items)


@pytest.mark.needs_cuda
def test_cuda_batch_decode_equals_the_cpu_items(tmp_path: Path) -> None:
    images = fake_images(24, 16, 16, channels=3, seed=5)
    cores = _write(tmp_path, images, domain="dct", colour="ycc", channel_mode="separate", bytes_ratio=0.3)
    on_gpu = cores.decode(np.arange(len(images)), device="cuda").cpu().permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(on_gpu, np.stack([cores.decode_one(i) for i in range(len(images))]))
