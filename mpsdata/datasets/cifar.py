"""MPS versions of torchvision's CIFAR-10 and CIFAR-100."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision

from ._base import RawSource, TrainTestDataset

__all__ = ["MPSCIFAR10", "MPSCIFAR100"]


class MPSCIFAR10(TrainTestDataset):
    """CIFAR-10 whose images are stored as MPS cores; a drop-in for ``torchvision.datasets.CIFAR10``.

    The raw pickle batches are read (and md5-checked) by torchvision from ``root/cifar-10-batches-py``, so a
    user who already has them downloads nothing again.

    Args:
        root: Root directory, as for torchvision.
        train: Training set if True, else test set.
        transform: Transform of the PIL image (RGB, 32x32).
        target_transform: Transform of the target.
        download: Fetch the raw archive through torchvision when it is missing.
        **options: Keyword-only MPS options: ``ratio`` (default 0.4), ``bond_dims``, ``max_bond``, ``tol``,
            ``residual``, ``site_dims`` (``"auto"`` searched), ``channel_mode``, ``core_dtype``, ``archive_dir``,
            ``domain``, ``colour``, ``luma_share`` (see :class:`~mpsdata.datasets.MPSVisionDataset`).

    Attributes:
        data: uint8 array ``(N, 32, 32, 3)`` of the decoded images (decoded on first access).
        targets: list of int.
        classes, class_to_idx: As torchvision's.
    """

    _torchvision_cls: type[torchvision.datasets.CIFAR10] = torchvision.datasets.CIFAR10
    image_mode = "RGB"
    image_shape = (3, 32, 32)

    def _default_archive_dir(self) -> Path:
        return Path(self.root) / self._torchvision_cls.base_folder / "mps"

    def _raw_exists(self) -> bool:
        return (Path(self.root) / self._torchvision_cls.base_folder).is_dir()

    def _download(self) -> None:
        self._torchvision_cls(self.root, train=self.train, download=True)

    def _source(self) -> RawSource:
        raw = self._torchvision_cls(self.root, train=self.train, download=False)  # checks the md5s
        files = raw.train_list if self.train else raw.test_list
        identity = {
            "dataset": self._torchvision_cls.__name__,
            "split": self._split,
            "files": {name: md5 for name, md5 in files},
        }
        images, targets = raw.data, np.asarray(raw.targets, dtype=np.int64)

        def batches(batch_size: int):
            for start in range(0, len(images), batch_size):
                block = images[start : start + batch_size].transpose(0, 3, 1, 2)
                yield torch.from_numpy(np.ascontiguousarray(block)), targets[start : start + batch_size]

        return RawSource(len(images), (3, 32, 32), batches, list(raw.classes), identity)

    @property
    def data(self) -> np.ndarray:
        return self._decoded().permute(0, 2, 3, 1).numpy()


class MPSCIFAR100(MPSCIFAR10):
    """CIFAR-100 whose images are stored as MPS cores; a drop-in for ``torchvision.datasets.CIFAR100``.

    Same arguments and attributes as :class:`MPSCIFAR10`; raw data under ``root/cifar-100-python``.
    """

    _torchvision_cls = torchvision.datasets.CIFAR100
