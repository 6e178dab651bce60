"""The base class of every MPS dataset: build or open a core file, then decode items on the fly."""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision.datasets import VisionDataset

from .._archive import (
    CORE_DTYPES,
    DEFAULT_COMPRESSION,
    filter_options,
    open_core_file,
    settings_key,
    write_core_file,
)
from .._errors import MPSDataError
from .._layout import make_layout
from .._mps import _from_candidate, _solve_bonds, check_budget, check_transform, search
from .._typing import ChannelMode, SiteDims
from ..download import fetch_published

__all__ = ["MPSVisionDataset", "RawSource", "TrainTestDataset"]

DEFAULT_RATIO = 0.4
#: Storage precision of the cores under a parameter budget, chosen by measurement (docs/format.md): float16
#: costs < 0.01 dB. Under a byte budget (``bytes_ratio``) the default is int8 (docs/bytes.md: int4 beats it on
#: Fashion-MNIST up to bytes_ratio 0.25 but loses 6.5-14.7 dB on colour photos at every budget, so no budget rule).
DEFAULT_CORE_DTYPE = "float16"
_BUILD_BATCH = 2048
#: Images ``site_dims="auto"`` searches on: a seeded random sample spread over the split.
AUTO_SAMPLE = 256
AUTO_SEED = 0
#: Storage of the images: per-image MPS cores, or the dataset-level shared representation (docs/format.md).
CODECS = ("mps", "shared")


@dataclass
class RawSource:
    """What a subclass hands to the builder: the raw images as batches, plus identity and classes."""

    num_samples: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    batches: Callable[[int], Iterator[tuple[torch.Tensor, np.ndarray]]]  # batch_size -> (uint8 BCHW, targets)
    classes: list[Any]
    identity: dict[str, Any] = field(default_factory=dict)  # dataset, split, file checksums


class MPSVisionDataset(VisionDataset):
    """A torchvision-style dataset whose images live as MPS cores in an HDF5 core file.

    On first use the core file is built from the raw dataset under ``root`` (torchvision's layout), or after
    downloading it with ``download=True``; afterwards the file is opened and items are decoded on the fly.
    Subclasses provide the raw data (:meth:`_raw_exists`, :meth:`_download`, :meth:`_source`) and attributes.

    The MPS options are keyword-only, as in :func:`mpsdata.decompose`; ``ratio`` defaults to 0.4 when no other
    budget is given; ``bytes_ratio`` is a byte budget instead (core bytes per image, values and scales, over the raw
    uint8 image, never exceeded; the file, HDF5 filter applied, is what :attr:`bytes_ratio` then reports).
    ``channel_mode`` defaults to ``"site"`` (colour channels as the last site of one MPS per image: 3 to 6 dB better
    than ``"separate"`` on photos at the same ratio, docs/layouts.md). ``core_dtype`` is the storage of the cores
    (``"float16"``, ``"float32"``, ``"int8"`` or ``"int4"``; default float16, or int8 with ``bytes_ratio``: int4
    wins only on simple grey images at small budgets, docs/bytes.md); ``compression`` the
    HDF5 filter of the core file (``"gzip"``, the default, ``"lzf"``, ``"zstd"`` with hdf5plugin, or ``None``);
    ``codec="shared"`` stores the split with the dataset-level shared representation instead of MPS cores (a
    shared block basis and entropy model fitted on the training split, a small entropy-coded core per image;
    ``bytes_ratio`` is then its only budget, see docs/format.md); ``archive_dir`` where core files live;
    ``bias=True`` serves the images with the residual bias stored by :func:`mpsdata.distill.save_bias` (and counts
    it in ``ratio`` and ``bytes_ratio``). ``domain`` (``"pixels"`` or ``"dct"``), ``colour`` (``"rgb"`` or
    ``"ycc"``, colour images) and ``luma_share`` are :func:`mpsdata.decompose`'s; the core file records the domain
    and colour and readers invert them. ``site_dims="auto"`` searches the layout, domain and colour (those not
    given) on a seeded random sample of :data:`AUTO_SAMPLE` images of the split when the file is built
    (:func:`mpsdata._mps.search`); the file is named after the request ``"auto"`` and stores the choice
    (``layout``, ``domain``, ``colour`` and ``search`` attributes, docs/format.md). With ``download=True`` a
    pre-compressed core file (MPS cores only) published for exactly these settings is fetched first (from ``mirrors``,
    ``MPSDATA_MIRROR`` or the shipped manifest, see docs/hosting.md); only when none is published is the raw data
    downloaded and compressed here.
    """

    image_mode = "L"
    #: Image size ``(C, H, W)`` before building, needed to name the core file (subclasses set it).
    image_shape: tuple[int, int, int] = (1, 28, 28)

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
        *,
        ratio: float | None = None,
        bytes_ratio: float | None = None,
        bond_dims: Sequence[int] | None = None,
        max_bond: int | None = None,
        tol: float | None = None,
        residual: int = 0,
        site_dims: SiteDims = None,
        channel_mode: ChannelMode = "site",
        core_dtype: str | None = None,
        compression: str | None = DEFAULT_COMPRESSION,
        archive_dir: str | os.PathLike | None = None,
        mirrors: str | Sequence[str] | None = None,
        bias: bool = False,
        domain: str | None = None,
        colour: str | None = None,
        luma_share: float | None = None,
        codec: str = "mps",
    ) -> None:
        super().__init__(root, transform=transform, target_transform=target_transform)
        if not isinstance(codec, str):
            raise TypeError(f"codec must be a string, one of {CODECS}; got {type(codec).__name__}")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
        self._codec = codec
        if codec == "shared":
            _check_shared_options(bytes_ratio, ratio, bond_dims, max_bond, tol, residual, site_dims, channel_mode,
                                  core_dtype, bias)  # fmt: skip
        elif ratio is None and bytes_ratio is None and bond_dims is None and max_bond is None and tol is None:
            ratio = DEFAULT_RATIO
        if codec == "mps":
            check_budget(ratio, bond_dims, max_bond, tol, residual, bytes_ratio)
        elif domain is not None or colour is not None or luma_share is not None:
            raise ValueError("domain, colour and luma_share are options of MPS cores; codec='shared' chooses its own "
                             "transform and colour handling, so leave them unset")  # fmt: skip
        auto = isinstance(site_dims, str) and site_dims == "auto"
        if channel_mode not in ("separate", "site"):
            raise ValueError(f"channel_mode must be 'separate' or 'site', got {channel_mode!r}")
        check_transform(domain, colour, luma_share, channel_mode, auto)
        if auto and ratio is None and bytes_ratio is None:
            raise ValueError("site_dims='auto' searches layouts at a ratio or bytes_ratio budget; give one of them")
        if colour == "ycc" and self.image_shape[0] != 3:
            channels = self.image_shape[0]
            raise ValueError(f"colour='ycc' takes colour images; {type(self).__name__} has {channels} channel(s)")
        if core_dtype is None:
            core_dtype = "int8" if bytes_ratio is not None else DEFAULT_CORE_DTYPE
        if core_dtype not in CORE_DTYPES:
            raise ValueError(f"core_dtype must be one of {CORE_DTYPES}, got {core_dtype!r}")
        filter_options(compression)  # fails early on a bad name or a missing plugin
        self._compression = "none" if compression is None else compression
        self._options: dict[str, Any] = {
            "ratio": ratio,
            "bytes_ratio": bytes_ratio,
            "bond_dims": None if bond_dims is None else [int(d) for d in bond_dims],
            "max_bond": max_bond,
            "tol": tol,
            "residual": residual,
            "site_dims": _jsonable_sites(site_dims),
            "channel_mode": channel_mode,
        }
        # Only options that were given join the settings: files of the defaults keep their names.
        given = {"domain": domain, "colour": colour, "luma_share": luma_share}
        self._options.update({k: v for k, v in given.items() if v is not None})
        self._split = split
        self._mirrors = mirrors
        self._archive_dir = Path(archive_dir) if archive_dir is not None else self._default_archive_dir()
        settings = self._settings(core_dtype) if codec == "mps" else self._shared_settings()
        path = self._archive_dir / f"{split}-{settings_key(settings)}.h5"
        existing = path.exists()
        if not existing:
            if codec == "mps":
                self._build(path, download, settings, core_dtype)
            else:
                self._build_shared(path, download, settings)
        self._cores = open_core_file(path, expected_settings=settings)
        # A plain attribute, as torchvision's: users relabel or subset through it, and items read it.
        self.targets = self._targets_from(self._cores.targets)
        self._targets_source: Any = None  # the tensor _targets_list copies, at _targets_version (see _target)
        self._targets_version = -1
        self._targets_list: list[int] = []
        self.classes = list(self._cores.meta["classes"])
        if existing:  # a file just built holds the raw data as it is now
            self._check_source()
        self._data: Any = None
        self._bias = None
        if bias:
            from ..distill import load_bias

            self._bias = load_bias(path)
            if self._bias is None:
                raise MPSDataError(
                    f"no residual bias is stored in {path}; learn one with mpsdata.distill.fit and store it with "
                    "mpsdata.distill.save_bias, or open the dataset with bias=False"
                )

    # -- hooks for subclasses ---------------------------------------------------------------------------
    def _check_source(self) -> None:
        """Refuse an existing core file whose raw data has changed since it was built (nothing to check by
        default)."""

    def _default_archive_dir(self) -> Path:
        return Path(self.root) / "mps"

    def _raw_exists(self) -> bool:
        raise NotImplementedError

    def _download(self) -> None:
        raise NotImplementedError

    def _source(self) -> RawSource:
        raise NotImplementedError

    def _not_found_message(self) -> str:
        return "Dataset not found. You can use download=True to download it"

    def _fit_split_dataset(self, download: bool) -> MPSVisionDataset | None:
        """With ``codec="shared"``: the dataset of the split the shared part is fitted on (opened, so built or
        reused), or ``None`` when this split is it. Subclasses with a training split return it for other splits."""
        return None

    # -- building -----------------------------------------------------------------------------------------
    def _settings(self, core_dtype: str) -> dict[str, Any]:
        channels, height, width = self.image_shape
        described, bonds = "auto", None  # site_dims="auto": the search decides when the file is built
        if self._options["site_dims"] != "auto":
            layout = make_layout(height, width, channels, self._options["site_dims"], self._options["channel_mode"])
            terms = self._options["residual"] + 1
            budget = {k: self._options[k] for k in ("ratio", "bond_dims", "max_bond", "tol", "bytes_ratio")}
            bonds, _ = _solve_bonds(layout, terms=terms, core_dtype=core_dtype, **budget)
            described = layout.describe()
            if self._options.get("colour") == "ycc" and self._options["channel_mode"] == "separate":
                bonds = None  # luma and chroma take shares of the budget: decompose solves both
        return {
            "dataset": type(self).__name__,
            "split": self._split,
            "image_shape": list(self.image_shape),
            **self._options,
            "layout": described,
            "resolved_bond_dims": list(bonds) if self._options["tol"] is None and bonds is not None else None,
            "core_dtype": core_dtype,
            "compression": self._compression,
        }

    def _build(self, path: Path, download: bool, settings: dict[str, Any], core_dtype: str) -> None:
        if download and fetch_published(settings, path, self._mirrors):
            return  # a published core file for exactly these settings is now at `path`
        source = self._raw_source(path, download)
        channels = source.image_shape[0]
        options, found = dict(self._options), None
        if options["site_dims"] == "auto":
            found = self._search(source, core_dtype)
            site_dims, domain, colour, luma_share = _from_candidate(found, options["channel_mode"])
            resolved = {"domain": domain, "colour": colour, "luma_share": luma_share}
            options.update(site_dims=_jsonable_sites(site_dims), **{k: v for k, v in resolved.items() if v is not None})
        write_core_file(
            path,
            source.batches(_BUILD_BATCH),
            num_samples=source.num_samples,
            image_shape=source.image_shape,
            image_mode=self.image_mode,
            options=options,
            core_dtype=core_dtype,
            compression=self._compression,
            settings=settings,
            meta={"classes": source.classes, "source": source.identity, "channels": channels},
            search=found,
        )

    def _search(self, source: RawSource, core_dtype: str) -> dict[str, Any]:
        """``site_dims="auto"``: search on a seeded random sample spread over the split (one pass over the data)."""
        count = min(AUTO_SAMPLE, source.num_samples)
        if count == 0:
            raise ValueError("cannot build a core file from an empty dataset")
        wanted = np.sort(np.random.default_rng(AUTO_SEED).choice(source.num_samples, count, replace=False))
        picked, start = [], 0
        for images, _ in source.batches(_BUILD_BATCH):
            stop = start + images.shape[0]
            inside = wanted[(wanted >= start) & (wanted < stop)] - start
            if inside.size:
                picked.append(torch.as_tensor(images)[torch.from_numpy(inside)])
            start = stop
        sample = torch.cat(picked)
        options = self._options
        return search(
            sample, ratio=options["ratio"], bytes_ratio=options["bytes_ratio"], core_dtype=core_dtype,
            residual=options["residual"], channel_mode=options["channel_mode"], domain=options.get("domain"),
            colour=options.get("colour"), luma_share=options.get("luma_share"),
        )  # fmt: skip

    def _raw_source(self, path: Path, download: bool) -> RawSource:
        """The raw data of this split (downloaded first with ``download``), checked against the expected shape."""
        if not self._raw_exists():
            if download:
                self._download()
            if not self._raw_exists():
                raise RuntimeError(
                    f"{self._not_found_message()} (no core file {path} and no raw data under {self.root})"
                )
        source = self._source()
        if tuple(source.image_shape) != tuple(self.image_shape):
            raise MPSDataError(f"raw images have shape {source.image_shape}, expected {self.image_shape}")
        return source

    # -- the shared codec -----------------------------------------------------------------------------------
    def _shared_settings(self) -> dict[str, Any]:
        return {
            "dataset": type(self).__name__,
            "split": self._split,
            "image_shape": list(self.image_shape),
            "codec": "shared",
            "bytes_ratio": self._options["bytes_ratio"],
            "compression": self._compression,
        }

    def _build_shared(self, path: Path, download: bool, settings: dict[str, Any]) -> None:
        """Fit the shared part on the training split (or take it from that split's file) and encode this split.

        The training split's file holds the fit; every other split opens (building if needed) that file and
        projects its images onto the same shared part, which its own file stores again so it decodes alone.
        """
        from .._shared_file import FIT_SAMPLE_BYTES, fit_for_dataset, write_shared_file

        if download and fetch_published(settings, path, self._mirrors):
            return  # published for exactly these settings: no training split or raw data needed
        fit_dataset = self._fit_split_dataset(download)
        source = self._raw_source(path, download)
        budget = self._options["bytes_ratio"]
        if fit_dataset is None:
            sample = _strided_sample(source, FIT_SAMPLE_BYTES)
            try:
                codec = fit_for_dataset(sample, budget, source.num_samples)
            except ValueError as error:
                raise ValueError(
                    f"cannot fit the shared codec for {path} at bytes_ratio={budget} on {sample.shape[0]} images of "
                    f"shape {tuple(source.image_shape)}: {error}"
                ) from None
            fit = {"split": self._split, "images": source.num_samples}
        else:
            codec = fit_dataset._cores.codec
            fit = {
                "split": fit_dataset._split,
                "images": len(fit_dataset),
                "file": fit_dataset.archive.name,
                "content_sha256": fit_dataset._cores.content_sha256,
            }
        fit["codec"] = codec.describe()
        write_shared_file(
            path,
            codec,
            source.batches(_BUILD_BATCH),
            num_samples=source.num_samples,
            image_mode=self.image_mode,
            compression=self._compression,
            settings=settings,
            meta={
                "classes": source.classes,
                "source": source.identity,
                "channels": source.image_shape[0],
                "shared_fit": fit,
            },
        )

    def _other_split_options(self) -> dict[str, Any]:
        """Keyword options that open another split of this dataset with the same shared-codec settings."""
        return {
            "codec": self._codec,
            "bytes_ratio": self._options["bytes_ratio"],
            "compression": None if self._compression == "none" else self._compression,
            "archive_dir": self._archive_dir,
            "mirrors": self._mirrors,
        }

    # -- the dataset ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._cores.num_samples

    def _target(self, index: int) -> int:
        """``int(self.targets[index])``. A tensor's element costs ~1 us to read; a list copy is read instead, made
        again whenever ``targets`` is replaced or changed in place (its ``_version`` counts in-place writes)."""
        targets = self.targets
        if not isinstance(targets, torch.Tensor):
            return int(targets[index])
        if targets is not self._targets_source or targets._version != self._targets_version:
            self._targets_list = targets.tolist()
            self._targets_source, self._targets_version = targets, targets._version
        return self._targets_list[index]

    def _targets_from(self, stored: torch.Tensor) -> Any:
        """The ``targets`` attribute in torchvision's type for this dataset (a list of ints unless overridden)."""
        return [int(t) for t in stored.tolist()]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """Returns ``(image, target)``: a PIL image of the original mode and size, and the class index."""
        index = operator.index(index)  # a slice or a float is refused, as torchvision's datasets do
        array = self._cores.decode_one(index)  # IndexError out of range
        if self._bias is not None:
            array = self._bias.apply_uint8_item(array, index)
        image = PIL.Image.fromarray(array)
        target = self._target(index)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def decode_batch(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, device=None, *, bias: bool | None = None
    ) -> torch.Tensor:
        """Decode many images at once, the fast path for training loops.

        Args:
            indices: Sample indices.
            device: Where to decode (``"cuda"`` decodes on the GPU); default CPU.
            bias: Add the stored residual bias; default: as the dataset was opened (``bias=``).

        Returns:
            uint8 tensor ``(len(indices), C, H, W)`` (no transforms applied).
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        index = np.asarray(indices, dtype=np.int64)
        images = self._cores.decode(index, device=device)
        if bias is None:
            bias = self._bias is not None
        if bias:
            if self._bias is None:
                raise ValueError("this dataset was opened without its bias: open it with bias=True")
            images = self._bias.apply_uint8(images, torch.from_numpy(index % max(len(self), 1)))
        return images

    @property
    def class_to_idx(self) -> dict[Any, int]:
        return {c: i for i, c in enumerate(self.classes)}

    @property
    def archive(self) -> Path:
        """Path of the HDF5 core file in use."""
        return self._cores.path

    @property
    def codec(self) -> str:
        """How the images are stored: ``"mps"`` (per-image cores) or ``"shared"`` (the shared representation)."""
        return self._codec

    @property
    def ratio(self) -> float:
        """Mean paper compression ratio of the stored images (parameters over pixel values), the residual
        bias included when the dataset serves it (``bias=True``); NaN with ``codec="shared"``, which has no
        per-image parameter count (see :attr:`bytes_ratio`)."""
        if self._codec == "shared":
            return float("nan")
        g = self._cores.geometry
        ranks = self._cores.ranks.to(torch.float64)  # (N, groups, n - 1)
        ones = torch.ones_like(ranks[..., :1])
        bonds = torch.cat([ones, ranks, ones], -1)
        sites = torch.tensor(g.layout.site_dims, dtype=torch.float64)
        params = (bonds[..., :-1] * sites * bonds[..., 1:]).sum((-1, -2))
        values = float(np.prod(self.image_shape))
        cores = float(params.mean() / values) if len(params) else 0.0
        return cores + (self._bias.ratio if self._bias is not None else 0.0)

    @property
    def bytes_ratio(self) -> float:
        """Bytes on disk over the bytes of the raw uint8 images: the core file, without its residual bias
        group unless the dataset serves the bias (``bias=True``)."""
        from ..distill import bias_info

        nbytes = self.archive.stat().st_size
        info = bias_info(self.archive) if self._bias is None else None
        if info is not None:
            nbytes -= info["bias_file_bytes"]
        return nbytes / max(1, len(self) * int(np.prod(self.image_shape)))

    @property
    def psnr(self) -> float:
        """Mean PSNR (dB) of the stored uint8 images against the originals, measured at build time."""
        mse = self._cores.mse.to(torch.float64).clamp_min(1e-10)
        return float((10 * torch.log10(255.0**2 / mse)).mean()) if len(mse) else float("nan")

    def _decoded(self) -> torch.Tensor:
        """Every image as the dataset serves it (the stored bias included when opened with ``bias=True``)."""
        if self._data is None:
            blocks = [
                self.decode_batch(np.arange(start, min(start + 8192, len(self)))) for start in range(0, len(self), 8192)
            ]
            c, h, w = self.image_shape
            self._data = torch.cat(blocks) if blocks else torch.empty((0, c, h, w), dtype=torch.uint8)
        return self._data

    def extra_repr(self) -> str:
        if self._codec == "shared":
            cores = self._cores
            fit = cores.meta["shared_fit"]
            return "\n".join(
                [
                    f"Split: {self._split.capitalize()}",
                    f"Codec: shared ({cores.codec.describe()}; fitted on the {fit['split']} split)",
                    f"Bytes ratio: {self.bytes_ratio:.4f} (core file / raw uint8)",
                    f"Amortised bytes ratio: {cores.amortised_bytes_ratio:.4f} (byte strings + lengths + shared part "
                    f"of {cores.shared_nbytes} bytes / {fit['images']} images)",
                    f"Archive: {self.archive}",
                ]
            )
        bias = "" if self._bias is None else f" incl. residual bias ({self._bias.form})"
        return "\n".join(
            [
                f"Split: {self._split.capitalize()}",
                f"Ratio: {self.ratio:.4f} (parameters / pixel values{bias})",
                f"Bytes ratio: {self.bytes_ratio:.4f} (core file / raw uint8)",
                f"Archive: {self.archive}",
            ]
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_data"] = None  # decoded data is a cache; workers decode what they need
        state["_targets_source"], state["_targets_list"] = None, []  # so is the list copy of the targets
        return state


def _check_shared_options(
    bytes_ratio, ratio, bond_dims, max_bond, tol, residual, site_dims, channel_mode, core_dtype, bias
) -> None:
    """``codec="shared"`` takes ``bytes_ratio`` as its budget and none of the MPS options."""
    if bytes_ratio is None or isinstance(bytes_ratio, bool) or not isinstance(bytes_ratio, (int, float)):
        raise ValueError(f"codec='shared' needs bytes_ratio= (a number, e.g. 0.2) as its budget, got {bytes_ratio!r}")
    if not 0 < bytes_ratio < float("inf"):
        raise ValueError(f"bytes_ratio must be positive and finite, got {bytes_ratio}")
    given = {
        "ratio": ratio,
        "bond_dims": bond_dims,
        "max_bond": max_bond,
        "tol": tol,
        "site_dims": site_dims,
        "core_dtype": core_dtype,
    }
    given = {key: value for key, value in given.items() if value is not None}
    if residual:
        given["residual"] = residual
    if channel_mode != "site":
        given["channel_mode"] = channel_mode
    if bias:
        given["bias"] = bias
    if given:
        raise ValueError(
            f"codec='shared' takes bytes_ratio= as its only budget; {sorted(given)} are options of the MPS codec: "
            "drop them, or use codec='mps'"
        )


def _strided_sample(source: RawSource, max_bytes: int) -> torch.Tensor:
    """Every k-th image of a source (all of them when they fit ``max_bytes``), as uint8 ``(n, C, H, W)``."""
    per_image = max(1, int(np.prod(source.image_shape)))
    stride = max(1, -(-source.num_samples * per_image // max_bytes))
    kept, seen = [], 0
    for images, _ in source.batches(_BUILD_BATCH):
        images = torch.as_tensor(images)
        first = (-seen) % stride  # the first index of this batch on the stride
        kept.append(images[first::stride])
        seen += images.shape[0]
    return torch.cat(kept) if kept else torch.empty((0, *source.image_shape), dtype=torch.uint8)


def _jsonable_sites(site_dims: SiteDims) -> Any:
    if site_dims is None or isinstance(site_dims, str):
        return site_dims
    return [list(d) if isinstance(d, (tuple, list)) else int(d) for d in site_dims]


class TrainTestDataset(MPSVisionDataset):
    """Base of the datasets with torchvision's ``train=True`` switch (MNIST family, CIFAR)."""

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
        **options: Any,
    ) -> None:
        self.train = train
        super().__init__(root, "train" if train else "test", transform, target_transform, download, **options)

    def _fit_split_dataset(self, download: bool) -> MPSVisionDataset | None:
        if self.train:
            return None
        return type(self)(self.root, train=True, download=download, **self._other_split_options())
