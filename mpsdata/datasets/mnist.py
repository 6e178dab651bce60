"""MPS versions of torchvision's MNIST and Fashion-MNIST."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch
import torchvision

from .._errors import MPSDataError
from ._base import RawSource, TrainTestDataset

__all__ = ["MPSMNIST", "MPSFashionMNIST"]


class MPSMNIST(TrainTestDataset):
    """MNIST whose images are stored as MPS cores; a drop-in for ``torchvision.datasets.MNIST``.

    Raw files are read from ``root/MNIST/raw`` (torchvision's layout, ``.gz`` or extracted), so a user who
    already has torchvision's copy downloads nothing again.

    Args:
        root: Root directory, as for torchvision (``root/MNIST/raw``).
        train: Training set if True, else test set.
        transform: Transform of the PIL image.
        target_transform: Transform of the target.
        download: Fetch the raw files through torchvision when they are missing.
        **options: Keyword-only MPS options: ``ratio`` (default 0.4), ``bond_dims``, ``max_bond``, ``tol``,
            ``residual``, ``site_dims`` (``"auto"`` searched), ``channel_mode``, ``core_dtype``, ``archive_dir``,
            ``domain``, ``colour``, ``luma_share``; or ``codec="shared"`` with ``bytes_ratio`` (see
            :class:`~mpsdata.datasets.MPSVisionDataset`).

    Attributes:
        data: uint8 tensor ``(N, 28, 28)`` of the decoded images (decoded on first access).
        targets: int64 tensor ``(N,)``.
        classes, class_to_idx: As torchvision's.
    """

    _torchvision_cls: type[torchvision.datasets.MNIST] = torchvision.datasets.MNIST
    image_mode = "L"
    image_shape = (1, 28, 28)

    @property
    def raw_folder(self) -> Path:
        return Path(self.root) / self._torchvision_cls.__name__ / "raw"

    def _default_archive_dir(self) -> Path:
        return Path(self.root) / self._torchvision_cls.__name__ / "mps"

    def _files(self) -> tuple[str, str]:
        prefix = "train" if self.train else "t10k"
        return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"

    def _find(self, name: str) -> Path | None:
        for candidate in (self.raw_folder / name, self.raw_folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def _raw_exists(self) -> bool:
        return all(self._find(name) is not None for name in self._files())

    def _download(self) -> None:
        self._torchvision_cls(self.root, train=self.train, download=True)

    def _source(self) -> RawSource:
        image_path, label_path = (self._find(name) for name in self._files())
        assert image_path is not None and label_path is not None
        images = read_idx(image_path, ndim=3)
        labels = read_idx(label_path, ndim=1)
        if len(images) != len(labels) or images.shape[1:] != (28, 28):
            raise MPSDataError(
                f"{image_path} holds {images.shape} images but {label_path} holds {len(labels)} labels; "
                "the raw files do not match, re-download them"
            )
        identity = {
            "dataset": self._torchvision_cls.__name__,
            "split": self._split,
            "files": {p.name: _sha256(p) for p in (image_path, label_path)},
        }

        def batches(batch_size: int):
            for start in range(0, len(images), batch_size):
                block = torch.from_numpy(images[start : start + batch_size].copy())
                yield block[:, None], labels[start : start + batch_size].astype(np.int64)

        return RawSource(len(images), (1, 28, 28), batches, list(self._torchvision_cls.classes), identity)

    def _targets_from(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(torch.int64).clone()  # int64 tensor, as torchvision's MNIST

    @property
    def data(self) -> torch.Tensor:
        return self._decoded()[:, 0]


class MPSFashionMNIST(MPSMNIST):
    """Fashion-MNIST whose images are stored as MPS cores; a drop-in for ``torchvision.datasets.FashionMNIST``.

    Same arguments and attributes as :class:`MPSMNIST`; raw files under ``root/FashionMNIST/raw``.

    Example:
        >>> import mpsdata  # doctest: +SKIP
        >>> ds = mpsdata.MPSFashionMNIST("data", train=True, download=True, ratio=0.4)  # doctest: +SKIP
        >>> image, target = ds[0]  # doctest: +SKIP
    """

    _torchvision_cls = torchvision.datasets.FashionMNIST


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file (the MNIST format), plain or gzip-compressed, as uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim or data[:2] != b"\x00\x00" or data[2] != 0x08 or data[3] != ndim:
        raise MPSDataError(f"{path} is not a uint8 idx file with {ndim} dims; delete it and download again")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise MPSDataError(f"{path} is truncated: header says {shape}, found {payload.size} values")
    return payload.reshape(shape)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
