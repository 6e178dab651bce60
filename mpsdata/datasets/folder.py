"""MPS versions of torchvision's ImageFolder and ImageNet: images of any size, resized and cropped first."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torchvision
import torchvision.transforms.functional as F
from torch.utils.data import DataLoader, Dataset

from .._errors import MPSDataError
from ._base import MPSVisionDataset, RawSource

__all__ = ["MPSImageFolder", "MPSImageNet"]

#: Side of the stored images. 256 lets both standard pipelines run on the decoded images:
#: ``RandomResizedCrop(224)`` for training and ``Resize(256) + CenterCrop(224)`` for evaluation.
DEFAULT_IMAGE_SIZE = 256
_SPLIT_ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar"}
_DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"


class _Resized(Dataset):
    """Loads an image file, converts it to RGB, resizes its shorter side and center-crops a square."""

    def __init__(self, samples: list[tuple[str, int]], size: int) -> None:
        self.samples = samples
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        try:
            with PIL.Image.open(path) as img:
                rgb = img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            raise MPSDataError(f"cannot read image {path} ({error}); remove or replace the file") from None
        square = F.center_crop(F.resize(rgb, self.size, antialias=True), [self.size, self.size])
        return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1), target


class MPSImageFolder(MPSVisionDataset):
    """Any ``root/class_x/xxx.png`` tree stored as MPS cores; a drop-in for ``torchvision.datasets.ImageFolder``.

    Images of any size are converted to RGB, their shorter side resized to ``image_size`` and a centered
    ``image_size x image_size`` square cropped, then compressed. The core file is built in batches (memory
    independent of the number of images) with ``build_workers`` processes reading images.

    Args:
        root: Folder of class folders, as for torchvision.
        transform: Transform of the PIL image (RGB, ``image_size`` square).
        target_transform: Transform of the target.
        download: Fetch a pre-compressed core file published for these settings, if any (images are never
            downloaded).
        image_size: Side of the stored square images (default 256).
        build_workers: Processes reading images during the build (default: up to 4).
        **options: Keyword-only MPS options, as in :class:`mpsdata.MPSCIFAR10`. ``archive_dir`` defaults to
            ``<root>-mps`` beside the folder, so torchvision's ImageFolder never sees it as a class.

    Attributes:
        classes, class_to_idx, targets: As torchvision's.
    """

    image_mode = "RGB"

    def __init__(
        self,
        root: str | os.PathLike,
        transform=None,
        target_transform=None,
        *,
        download: bool = False,
        image_size: int = DEFAULT_IMAGE_SIZE,
        build_workers: int | None = None,
        **options: Any,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2:
            raise ValueError(f"image_size must be an int >= 2, got {image_size!r}")
        self.image_size = image_size
        self.image_shape = (3, image_size, image_size)
        self._build_workers = min(4, os.cpu_count() or 1) if build_workers is None else build_workers
        super().__init__(root, self._split_name(), transform, target_transform, download, **options)

    def _split_name(self) -> str:
        return "all"

    def _default_archive_dir(self) -> Path:
        root = Path(self.root).resolve()  # "." has no name: its sibling folder needs the real one
        return root.parent / f"{root.name}-mps"

    def _image_root(self) -> Path:
        return Path(self.root)

    def _raw_exists(self) -> bool:
        return self._image_root().is_dir()

    def _download(self) -> None:
        pass  # no raw images to fetch: the caller reports them missing

    def _not_found_message(self) -> str:
        return f"Image folder not found: {self._image_root()} holds no class folders of images"

    def _listing(self) -> torchvision.datasets.ImageFolder:
        return torchvision.datasets.ImageFolder(str(self._image_root()))

    def _source(self) -> RawSource:
        listing = self._listing()
        samples = [(str(p), int(t)) for p, t in listing.samples]
        identity = {
            "dataset": type(self).__name__,
            "split": self._split,
            **_listing_identity(samples, self._image_root()),
            **self._listing_extra(listing),
        }
        loader_data = _Resized(samples, self.image_size)

        def batches(batch_size: int):
            loader = DataLoader(loader_data, batch_size=batch_size, num_workers=self._build_workers, shuffle=False)
            for images, targets in loader:
                yield images, targets.numpy().astype(np.int64)

        return RawSource(len(samples), self.image_shape, batches, self._class_names(listing), identity)

    def _class_names(self, listing) -> list[Any]:
        return list(listing.classes)

    def _listing_extra(self, listing) -> dict[str, Any]:
        """More of the listing kept in the file's source identity (none here)."""
        return {}

    def _check_source(self) -> None:
        """An image tree changes (images and classes added or removed) where torchvision's ImageFolder would list
        the new one: the core file of the old tree would silently disagree with it in length and labels. Costs
        the listing torchvision's ImageFolder makes on every construction; skipped without the tree (a core file
        fetched on its own)."""
        if not self._image_root().is_dir():
            return
        listing = self._listing()
        stored = self._cores.meta["source"]
        classes = json.loads(json.dumps(self._class_names(listing)))  # as stored: tuples become lists
        if len(listing.samples) != stored["files"] or classes != self._cores.meta["classes"]:
            raise MPSDataError(
                f"{self._image_root()} changed since {self.archive} was built: it lists {len(listing.samples)} "
                f"images in {len(classes)} classes, the core file holds {stored['files']} in "
                f"{len(self._cores.meta['classes'])}; delete the core file to rebuild it from the tree as it is now"
            )

    def extra_repr(self) -> str:
        return f"Image size: {self.image_size}\n{super().extra_repr()}"


class MPSImageNet(MPSImageFolder):
    """ImageNet 2012 stored as MPS cores; a drop-in for ``torchvision.datasets.ImageNet``.

    Reads torchvision's layout under ``root`` (``meta.bin`` or the devkit archive, and the ``train``/``val``
    folders or their archives, which torchvision unpacks on first use). ImageNet cannot be downloaded
    automatically.

    Args:
        root: ImageNet root, as for torchvision.
        split: ``"train"`` or ``"val"``.
        transform, target_transform: As torchvision's.
        download: Fetch a pre-compressed core file published for these settings; the raw images can only be
            downloaded by hand.
        image_size, build_workers, **options: As :class:`MPSImageFolder`; ``archive_dir`` defaults to
            ``root/mps``.

    Attributes:
        classes: List of class-name tuples; class_to_idx maps every name to its index.
        wnids, wnid_to_idx: WordNet ids, as torchvision's.
        targets: list of int.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform=None,
        target_transform=None,
        *,
        download: bool = False,
        **options: Any,
    ) -> None:
        torchvision.datasets.utils.verify_str_arg(split, "split", ("train", "val"))
        self._imagenet_split = split
        super().__init__(root, transform, target_transform, download=download, **options)
        self.split = split
        self.classes = [tuple(names) for names in self.classes]
        self.wnids = list(self._cores.meta["source"]["wnids"])

    def _split_name(self) -> str:
        return self._imagenet_split

    def _fit_split_dataset(self, download: bool) -> MPSVisionDataset | None:
        if self._imagenet_split == "train":
            return None
        return type(self)(self.root, split="train", download=download, image_size=self.image_size,
                          build_workers=self._build_workers, **self._other_split_options())  # fmt: skip

    def _default_archive_dir(self) -> Path:
        return Path(self.root) / "mps"

    def _image_root(self) -> Path:
        return Path(self.root) / self._imagenet_split

    def _raw_exists(self) -> bool:
        root = Path(self.root)
        has_meta = (root / "meta.bin").is_file() or (root / _DEVKIT).is_file()
        has_split = self._image_root().is_dir() or (root / _SPLIT_ARCHIVES[self._imagenet_split]).is_file()
        return has_meta and has_split

    def _not_found_message(self) -> str:
        return (
            f"ImageNet not found: {self.root} needs meta.bin (or {_DEVKIT}) and the {self._imagenet_split} folder "
            f"(or {_SPLIT_ARCHIVES[self._imagenet_split]}); download them from https://image-net.org"
        )

    def _listing(self) -> torchvision.datasets.ImageNet:
        return torchvision.datasets.ImageNet(str(self.root), split=self._imagenet_split)

    def _listing_extra(self, listing) -> dict[str, Any]:
        return {"wnids": list(listing.wnids)}  # from the listing the build made: a second one rescans the tree

    def _class_names(self, listing) -> list[Any]:
        return [list(names) for names in listing.classes]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: idx for idx, names in enumerate(self.classes) for name in names}

    @property
    def wnid_to_idx(self) -> dict[str, int]:
        return {wnid: idx for idx, wnid in enumerate(self.wnids)}


def _listing_identity(samples: list[tuple[str, int]], root: Path) -> dict[str, Any]:
    """Identity of an image tree: file count and a hash of relative paths, sizes and targets."""
    digest = hashlib.sha256()
    for path, target in samples:
        digest.update(f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\t{target}\n".encode())
    return {"files": len(samples), "listing_sha256": digest.hexdigest()}
