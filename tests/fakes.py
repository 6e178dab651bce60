"""Tiny fake datasets written in their original raw formats, for the dataset, archive and CLI tests.

Each writer puts a few images under a root exactly where torchvision (and so mpsdata) looks for them: MNIST
idx files, CIFAR pickle batches, an ImageNet tree with ``meta.bin``, an ImageFolder tree. Images are smooth
patterns plus noise, so that an MPS at a moderate budget reconstructs them well but not exactly.
"""

from __future__ import annotations

import gzip
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

__all__ = [
    "FakeSplit",
    "fake_images",
    "write_cifar",
    "write_idx",
    "write_image_folder",
    "write_imagenet",
    "write_mnist",
]


@dataclass
class FakeSplit:
    """What a fake split holds: images uint8 ``(N, H, W)`` or ``(N, H, W, C)`` and int64 labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray


def fake_images(count: int, height: int, width: int, channels: int = 0, seed: int = 0) -> np.ndarray:
    """uint8 images ``(count, H, W)`` (or ``(count, H, W, C)`` with ``channels``): a few outer products + noise."""
    rng = np.random.default_rng(seed)
    shape_c = max(channels, 1)
    rows = rng.normal(size=(count, shape_c, 3, height, 1))
    cols = rng.normal(size=(count, shape_c, 3, 1, width))
    smooth = (rows * cols).sum(2)  # rank-3 per channel
    noisy = smooth / np.abs(smooth).max(axis=(-2, -1), keepdims=True) * 100 + 128 + rng.normal(0, 8, smooth.shape)
    images = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return images[:, 0] if channels == 0 else images.transpose(0, 2, 3, 1).copy()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array in the idx format of MNIST (gzip-compressed when ``path`` ends in ``.gz``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def write_mnist(
    raw_dir: Path, num_train: int = 40, num_test: int = 24, gz: bool = True, seed: int = 0
) -> dict[str, FakeSplit]:
    """The four idx files of MNIST / Fashion-MNIST in ``raw_dir`` (e.g. ``root/FashionMNIST/raw``)."""
    rng = np.random.default_rng(seed + 1)
    splits = {}
    for offset, (split, prefix, count) in enumerate((("train", "train", num_train), ("test", "t10k", num_test))):
        images = fake_images(count, 28, 28, seed=seed + 10 * offset)
        labels = rng.integers(0, 10, count).astype(np.int64)
        suffix = ".gz" if gz else ""
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))
        splits[split] = FakeSplit(images, labels)
    return splits


def write_cifar(
    root: Path, cifar100: bool = False, per_batch: int = 6, num_test: int = 10, seed: int = 0
) -> dict[str, FakeSplit]:
    """CIFAR-10 (five train batches + test batch + ``batches.meta``) or CIFAR-100 (train, test, meta) pickles.

    The files' md5 sums are not torchvision's: tests patch ``torchvision.datasets.cifar.check_integrity``.
    """
    rng = np.random.default_rng(seed + 1)
    num_classes = 100 if cifar100 else 10
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "fine_labels" if cifar100 else "labels"
    files = [("train", 1 if cifar100 else 5, per_batch * (5 if cifar100 else 1)), ("test", 1, num_test)]
    splits = {}
    for split, num_files, count in files:
        images, labels = [], []
        for b in range(num_files):
            x = fake_images(count, 32, 32, channels=3, seed=seed + 100 * (split == "test") + b)
            y = rng.integers(0, num_classes, count).astype(np.int64)
            name = split if cifar100 else ("test_batch" if split == "test" else f"data_batch_{b + 1}")
            entry = {"data": x.transpose(0, 3, 1, 2).reshape(count, -1), label_key: [int(v) for v in y]}
            if cifar100:
                entry["coarse_labels"] = [int(v) // 5 for v in y]
            with open(folder / name, "wb") as f:
                pickle.dump(entry, f)
            images.append(x)
            labels.append(y)
        splits[split] = FakeSplit(np.concatenate(images), np.concatenate(labels))
    meta_name, meta_key = ("meta", "fine_label_names") if cifar100 else ("batches.meta", "label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"class_{i:03d}" for i in range(num_classes)]}, f)
    return splits


def _save_image(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.fromarray(array)
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("P")
    fmt = "JPEG" if path.suffix.upper() in (".JPEG", ".JPG") else "PNG"
    image.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "eel"),
    per_class: int = 4,
    sizes: tuple[tuple[int, int], ...] = ((20, 24), (30, 18), (16, 16), (40, 33)),
    modes: tuple[str, ...] = ("RGB", "L", "RGBA", "P"),
    suffix: str = ".png",
    seed: int = 0,
) -> list[tuple[Path, int]]:
    """``root/<class>/<i><suffix>`` images of varied sizes and modes; returns ``(path, class index)``."""
    samples = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            height, width = sizes[i % len(sizes)]
            array = fake_images(1, height, width, channels=3, seed=seed + 31 * c + i)[0]
            path = root / name / f"img_{i:03d}{suffix}"
            _save_image(path, array, modes[(c + i) % len(modes)])
            samples.append((path, c))
    return samples


def write_imagenet(
    root: Path,
    wnids: tuple[str, ...] = ("n01440764", "n01443537", "n01484850"),
    per_class: int = 3,
    seed: int = 0,
) -> dict[str, tuple[str, ...]]:
    """ImageNet as torchvision reads it once unpacked: ``meta.bin`` and ``train/<wnid>/<wnid>_<i>.JPEG``."""
    wnid_to_classes = {wnid: (f"name {k}", f"alias {k}") for k, wnid in enumerate(wnids)}
    val_wnids = [wnid for wnid in wnids for _ in range(2)]
    root.mkdir(parents=True, exist_ok=True)
    torch.save((wnid_to_classes, val_wnids), root / "meta.bin")
    sizes = ((20, 26), (24, 17), (18, 18))
    for k, wnid in enumerate(wnids):
        for i in range(per_class):
            height, width = sizes[i % len(sizes)]
            array = fake_images(1, height, width, channels=3, seed=seed + 17 * k + i)[0]
            _save_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", array, "RGB")
    return wnid_to_classes


def write_twice_at_once(write: Callable[[Callable[[], object]], None]) -> list[BaseException]:
    """Run ``write(wait)`` in two threads at once and return what they raised. A writer calls ``wait()`` once its
    temporary file is open; it returns when both are, so the two writes overlap for certain."""
    both_open = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            write(both_open.wait)
        except BaseException as error:
            errors.append(error)
            both_open.abort()  # the other writer must not wait for this one

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
